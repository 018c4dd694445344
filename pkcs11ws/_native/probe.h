/*
 * probe.h: copy a string a host points at without ever faulting on it (C_Initialize's pReserved).
 *
 * PKCS#11 says pReserved must be NULL, but p11-kit and pkcs11-provider pass free-form strings
 * there and the module reads `config=PATH` from them, so a non-NULL pointer has to be read. A
 * host may also pass any pointer at all (google pkcs11test passes (void *)1): dereferencing it
 * would crash the host. So the bytes are copied with process_vm_readv() on this very process,
 * which answers EFAULT for an unmapped address instead of raising SIGSEGV, one page at a time
 * (a page is readable as a whole or not at all), until the NUL or the bound. Where that
 * syscall is refused (seccomp, an LSM), write() into a pipe does the same check.
 */
#ifndef PKCS11WS_PROBE_H
#define PKCS11WS_PROBE_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

/* 0 when the n bytes at src (all on one page) were copied to dst, -1 when any is unreadable. */
static int p11ws_peek(const char *src, char *dst, size_t n)
{
    struct iovec local = {dst, n}, remote = {(void *)src, n};
    long got = syscall(SYS_process_vm_readv, (long)getpid(), &local, 1UL, &remote, 1UL, 0UL);
    if (got == (long)n)
        return 0;
    if (got >= 0 || errno == EFAULT)
        return -1;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return -1;
    /* n <= one page: fits in the pipe, so neither call blocks. */
    int rc = write(fds[1], src, n) == (ssize_t)n && read(fds[0], dst, n) == (ssize_t)n ? 0 : -1;
    close(fds[0]);
    close(fds[1]);
    return rc;
}

/* Copy the NUL-terminated string at src into out[cap]: its length, or -1 when it is not
 * readable up to a NUL within cap bytes (unmapped, or unterminated, or too long). */
static long p11ws_copy_cstring(const void *src, char *out, size_t cap)
{
    const long page = sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096;
    uintptr_t at = (uintptr_t)src;
    size_t done = 0;
    while (done < cap) {
        size_t n = (size_t)page - (at + done) % (size_t)page;
        if (n > cap - done)
            n = cap - done;
        if (at + done < at || p11ws_peek((const char *)(at + done), out + done, n) != 0)
            return -1;
        char *nul = memchr(out + done, '\0', n);
        if (nul != NULL)
            return (long)(nul - out);
        done += n;
    }
    return -1;
}

#endif /* PKCS11WS_PROBE_H */
