"""Cython core of the PKCS#11 module (function list, handle tables, templates, buffers)."""
