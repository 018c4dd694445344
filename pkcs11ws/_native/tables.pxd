# The contract of the core's C-side tables (implemented in tables.pxi, used by every f_*):
# their row types, and which lock guards what.
#
#   slots:      slot ID -> SlotRow (present, logged in, PIN flags, session counts, strings)
#   sessions:   handle -> Session (slot, flags, operation state, search);
#               handle = generation << SESSION_INDEX_BITS | (index + 1)
#   objects:    handle -> ObjRow (slot, class, key type, usage bits: what C_*Init checks
#               without Python)
#   mechanisms: MechRow, copied once from pkcs11ws.mechanisms at import, read-only after
#
# Locks (core.pyx and tables.pxi), outermost first:
#   g_state_lock  C_Initialize/C_Finalize only (taken GIL-aware and owner-aware: _state_lock)
#   g_sess_lock   the session table, every Session's fields (refs, closed, ops, find state)
#   g_slot_lock   the slot table (g_slots, g_nslots)
#   g_obj_lock    the object table (g_objs, g_nobjs, g_objs_cap); never held with another
# Rules: g_sess_lock before g_slot_lock (_slot_count runs with g_sess_lock held). A thread that
# holds a table lock never asks for the GIL; a thread holding the GIL may take a table lock
# (the hooks the provider calls, _keep). fork(): the loader's atfork handler takes all three
# table locks in this order (p11ws_core_fork).
# A Session* from _session_get carries a reference: release it once, with _session_put (the
# entry points do it in one `finally`).

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)

cdef extern from "pyglue.h" nogil:
    void p11ws_adopt_thread()
    void p11ws_lock_gil_aware(pthread_mutex_t*)
    int p11ws_aload(const int*)
    void p11ws_astore(int*, int)

from pkcs11ws._native.ck cimport *  # noqa: F403
# PARAM_*, RULE_*, MULTI_*, FAMILY_*: generated from mechanisms.KINDS.
from pkcs11ws._native.mech_gen cimport *  # noqa: F403

cdef enum:
    OP_ENCRYPT = 0
    OP_DECRYPT = 1
    OP_SIGN = 2
    OP_VERIFY = 3
    OP_DIGEST = 4  # keyless, in the module (digest.pxi)
    N_OPS = 5
    MAX_MECHS = 64
    MAX_SESSIONS = 65535
    SESSION_INDEX_BITS = 16


cdef struct MechRow:
    CK_MECHANISM_TYPE type
    CK_FLAGS flags
    CK_ULONG min_key
    CK_ULONG max_key
    int param  # PARAM_*
    CK_ULONG out_len
    int padded
    int rule  # RULE_*
    int multi  # MULTI_*
    int family  # FAMILY_*
    CK_OBJECT_CLASS key_class[4]  # per OP_*: the class of key the operation takes
    int key_sized  # the output length is the key's (ObjRow.size), not out_len
    int nkt
    CK_KEY_TYPE key_types[4]


cdef struct OpState:
    # One cryptographic operation of a session (encrypt, decrypt, sign, verify or digest).
    int active
    int row
    CK_MECHANISM_TYPE mech
    CK_OBJECT_HANDLE key
    CK_ULONG mac_len  # MAC or signature length (RSA: the modulus' bytes)
    CK_ULONG tag_len  # AES-GCM: the tag's bytes
    CK_BYTE iv[16]
    # A struct parameter (PSS, OAEP, GCM) as its parser serialised it for the provider.
    CK_BYTE* prm
    CK_ULONG prmlen
    # CBC-PAD decryption into a buffer smaller than the bound: the result is kept so that
    # the retry with a bigger buffer costs no second round trip.
    CK_BYTE* kept_in
    CK_ULONG kept_in_len
    CK_BYTE* kept_out
    CK_ULONG kept_out_len
    # Multi-part (C_*Update/C_*Final): iv is then the CBC chaining value, part the bytes held
    # back for the next request (at most one block), acc the data an HMAC accumulates.
    int multi
    CK_BYTE part[16]
    CK_ULONG partlen
    CK_BYTE* acc
    CK_ULONG acclen
    CK_ULONG acccap


cdef struct Session:
    # Every field is guarded by g_sess_lock (an entry point copies what it needs under it).
    CK_SESSION_HANDLE handle
    CK_SLOT_ID slot
    CK_FLAGS flags
    int refs
    int closed
    OpState ops[N_OPS]
    int find_active
    CK_OBJECT_HANDLE* found
    CK_ULONG nfound
    CK_ULONG found_pos


cdef struct SlotRow:
    int known
    int present
    int logged_in
    CK_FLAGS pin_flags  # CKF_USER_PIN_COUNT_LOW/FINAL_TRY/LOCKED, as the provider last saw
    CK_ULONG sessions
    CK_ULONG rw_sessions
    CK_UTF8CHAR label[32]
    CK_UTF8CHAR desc[64]
    CK_CHAR serial[16]


cdef struct ObjRow:
    int live
    CK_SLOT_ID slot
    CK_OBJECT_CLASS cls
    CK_KEY_TYPE key_type
    CK_ULONG usage
    CK_ULONG size  # RSA: modulus bytes; EC: signature (r || s) bytes; else 0
    int private  # CKA_PRIVATE: only a public public key is used before C_Login
