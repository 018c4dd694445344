/*
 * shim_module.c: the PKCS#11 module pkcs11-provider loads in openssl_threads.c's configuration.
 * Its C_GetFunctionList tells the host it was called (host_shim_called, exported by the host
 * executable), then hands over to the real module (P11WS_SHIM_TARGET): the calls that follow
 * (C_Initialize, ...) go to the module directly, from inside OpenSSL's configuration.
 */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include <dlfcn.h>
#include <stdlib.h>

#include "pkcs11ws_ck.h"

__attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    void (*called)(void) = (void (*)(void))dlsym(RTLD_DEFAULT, "host_shim_called");
    if (called != NULL)
        called();
    const char *target = getenv("P11WS_SHIM_TARGET");
    void *h = target != NULL ? dlopen(target, RTLD_NOW | RTLD_LOCAL) : NULL;
    CK_C_GetFunctionList get = h ? (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList") : NULL;
    return get != NULL ? get(list) : CKR_GENERAL_ERROR;
}
