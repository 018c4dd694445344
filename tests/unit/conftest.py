"""The unit layer: code tested in-process, with no key service running and no built module
loaded: configuration and log parsing, the protocol schema and its generated docs, settings,
the access log, the store contract (on SQLite, and on the session's PostgreSQL for the `pg`
cases), the client's policy and transport pieces on scripted answers, the generated C ABI files.

No fixtures of its own yet: a fixture two unit files share goes here, once.
"""
