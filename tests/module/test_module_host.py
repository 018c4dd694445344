"""libpkcs11ws.so inside a C program (no Python in the host): the module boots its own
interpreter. A small host is compiled by the test against include/pkcs11ws_ck.h and dlopen()s
the module RTLD_LOCAL, like pkcs11-tool or a JVM would. It checks the round trip, 8 threads at
once, fork() (the child starts uninitialised and must call C_Initialize; the parent's
connections survive), fork while another thread is busy inside the module, and
C_Finalize/C_Initialize cycles. The passphrase goes to the host on stdin, never in argv.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from pkcs11ws.__main__ import module_path
from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config

ROOT = Path(__file__).resolve().parents[2]

HOST_C = r"""
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "pkcs11ws_ck.h"

static CK_FUNCTION_LIST *f;
static char label[33], pin[300];
static CK_SLOT_ID slot;
static CK_OBJECT_HANDLE key;
static int iters;
static volatile int busy_stop;

#define CHECK(call) do { CK_RV rv_ = (call); if (rv_ != CKR_OK) { \
    printf("FAIL %s = 0x%lx (line %d)\n", #call, rv_, __LINE__); fflush(stdout); exit(1); } \
    } while (0)

static void find_slot(void) {
    CK_SLOT_ID slots[256];
    CK_ULONG n = 256;
    CHECK(f->C_GetSlotList(CK_TRUE, slots, &n));
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO ti;
        CHECK(f->C_GetTokenInfo(slots[i], &ti));
        if (memcmp(ti.label, label, 32) == 0) { slot = slots[i]; return; }
    }
    printf("FAIL token not found\n");
    exit(1);
}

static CK_SESSION_HANDLE session(int login) {
    CK_SESSION_HANDLE h;
    CHECK(f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &h));
    if (login) {
        CK_RV rv = f->C_Login(h, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
        if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) CHECK(rv);
    }
    return h;
}

static void round_trip(CK_SESSION_HANDLE h, size_t len) {
    unsigned char iv[16] = {1, 2, 3}, data[256], ct[272], pt[272];
    CK_MECHANISM m = {CKM_AES_CBC_PAD, iv, 16};
    CK_ULONG n = 0, p = sizeof pt;
    for (size_t i = 0; i < len; i++) data[i] = (unsigned char)(i * 7 + len);
    CHECK(f->C_EncryptInit(h, &m, key));
    CHECK(f->C_Encrypt(h, data, len, NULL, &n));
    if (n != (len / 16 + 1) * 16) { printf("FAIL length query %lu\n", n); exit(1); }
    CHECK(f->C_Encrypt(h, data, len, ct, &n));
    CHECK(f->C_DecryptInit(h, &m, key));
    CHECK(f->C_Decrypt(h, ct, n, pt, &p));
    if (p != len || memcmp(pt, data, len) != 0) { printf("FAIL round trip\n"); exit(1); }
}

static void *worker(void *arg) {
    CK_SESSION_HANDLE h = session(0);
    for (int i = 0; i < iters; i++) round_trip(h, (size_t)(i * 13) % 200);
    CHECK(f->C_CloseSession(h));
    return arg;
}

static void *busy(void *arg) {
    CK_SESSION_HANDLE h = session(0);
    while (!busy_stop) round_trip(h, 100);
    CHECK(f->C_CloseSession(h));
    return arg;
}

static void find_key(CK_SESSION_HANDLE h) {
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, "hostkey", 7}};
    CK_ULONG n = 0;
    CHECK(f->C_FindObjectsInit(h, t, 2));
    CHECK(f->C_FindObjects(h, &key, 1, &n));
    CHECK(f->C_FindObjectsFinal(h));
    if (n != 1) { printf("FAIL key not found\n"); exit(1); }
}

static int child_body(void) {
    CK_INFO info;
    if (f->C_GetInfo(&info) != CKR_CRYPTOKI_NOT_INITIALIZED) return 10;
    if (f->C_Initialize(NULL) != CKR_OK) return 11;
    find_slot();
    CK_SESSION_HANDLE h = session(1);
    find_key(h);
    round_trip(h, 33);
    if (f->C_Finalize(NULL) != CKR_OK) return 12;
    return 0;
}

static void fork_and_check(const char *what) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) _exit(child_body());
    int st = 0;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        printf("FAIL fork child (%s): status 0x%x\n", what, st);
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) { printf("FAIL dlopen %s\n", dlerror()); return 1; }
    memset(label, ' ', 32);
    memcpy(label, argv[2], strlen(argv[2]));
    int nthreads = atoi(argv[3]);
    iters = 10;
    if (!fgets(pin, sizeof pin, stdin)) return 2;
    pin[strcspn(pin, "\n")] = 0;
    CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    CHECK(gfl(&f));
    CHECK(f->C_Initialize(NULL));
    CK_INFO info;
    CHECK(f->C_GetInfo(&info));
    printf("cryptoki %d.%d\n", info.cryptokiVersion.major, info.cryptokiVersion.minor);
    find_slot();
    CK_SESSION_HANDLE h = session(1);
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_KEY_TYPE, &kt, sizeof kt},
                        {CKA_VALUE_LEN, &len, sizeof len}, {CKA_TOKEN, &yes, 1},
                        {CKA_PRIVATE, &yes, 1}, {CKA_ENCRYPT, &yes, 1}, {CKA_DECRYPT, &yes, 1},
                        {CKA_LABEL, "hostkey", 7}};
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
    CHECK(f->C_GenerateKey(h, &gen, t, 8, &key));
    round_trip(h, 100);
    printf("round trip ok\n");

    pthread_t th[64];
    for (int i = 0; i < nthreads; i++) pthread_create(&th[i], NULL, worker, NULL);
    for (int i = 0; i < nthreads; i++) pthread_join(th[i], NULL);
    printf("threads ok\n");

    fork_and_check("idle");
    round_trip(h, 50);
    printf("fork ok\n");

    pthread_t b;
    pthread_create(&b, NULL, busy, NULL);
    for (int i = 0; i < 5; i++) { usleep(20000); fork_and_check("busy"); }
    busy_stop = 1;
    pthread_join(b, NULL);
    round_trip(h, 50);
    printf("fork while busy ok\n");

    CHECK(f->C_Finalize(NULL));
    if (f->C_GetInfo(&info) != CKR_CRYPTOKI_NOT_INITIALIZED) {
        printf("FAIL finalize\n");
        return 1;
    }
    CHECK(f->C_Initialize(NULL));
    find_slot();
    h = session(1);
    round_trip(h, 10);
    CHECK(f->C_Finalize(NULL));
    printf("reinitialize ok\n");
    return 0;
}
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("host")
    (d / "host.c").write_text(HOST_C)
    exe = d / "host"
    subprocess.run(
        [
            "gcc",
            "-O1",
            "-Wall",
            "-Werror",
            "-I",
            str(ROOT / "include"),
            "-o",
            str(exe),
            str(d / "host.c"),
            "-ldl",
            "-lpthread",
        ],
        check=True,
    )
    return exe


def test_c_host_threads_fork_and_reinitialize(host, own_service):
    # Its own service: the host lists slots into a fixed 256-entry array, and the shared service
    # may hold more softcards than that by the time a random order reaches this test.
    service = own_service
    client = KeyServiceClient(load_config(str(service.client_cfg)))
    name = "h" + uuid.uuid4().hex[:12]
    pin = uuid.uuid4().hex
    client.create_softcard(name, pin.encode())
    client.close()
    env = {**os.environ, "PKCS11WS_CONFIG": str(service.client_cfg)}
    env.pop("PYTHONPATH", None)
    r = subprocess.run(
        [str(host), module_path(), name, "8"],
        input=pin + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "cryptoki 2.40",
        "round trip ok",
        "threads ok",
        "fork ok",
        "fork while busy ok",
        "reinitialize ok",
    ], r.stdout
    assert pin not in r.stderr


def test_c_host_reports_a_bad_configuration(host, tmp_path):
    cfg = tmp_path / "broken.cfg"
    cfg.write_text("HOST 127.0.0.1\nPORT 0\n")
    env = {**os.environ, "PKCS11WS_CONFIG": str(cfg)}
    r = subprocess.run(
        [str(host), module_path(), "none", "1"],
        input="x\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "FAIL f->C_Initialize(NULL) = 0x5" in r.stdout  # CKR_GENERAL_ERROR
    assert "libpkcs11ws: C_Initialize:" in r.stderr and str(cfg) in r.stderr
