/* Fail the Nth file write, sync or rename under a folder with a chosen errno, in the manner of SQLite's own
 * I/O-error tests, from outside the process: loaded with LD_PRELOAD, so it reaches SQLite's C writes as well as
 * Python's.
 *
 *   gcc -shared -fPIC -O2 -o faultshim.so faultshim.c -ldl -lpthread
 *   LD_PRELOAD=./faultshim.so FAULT_DIR=/abs/data FAULT_CONTROL=/tmp/control FAULT_COUNT=/tmp/count  program
 *
 * FAULT_DIR: calls on files under this absolute folder are counted (fds are resolved by /proc/self/fd/N, relative
 * paths against the working directory). FAULT_CONTROL: a file read at each such call; while it is missing nothing
 * is counted or failed, so start-up writes are left alone. It holds one line, "GENERATION AT ERRNO PERSIST OPS":
 * a new GENERATION restarts the count; the AT-th counted call fails with ERRNO (every one from AT on when PERSIST
 * is 1; none when AT is 0: count only); OPS is a comma list of write, sync and rename. FAULT_COUNT: rewritten after
 * each counted call with "GENERATION COUNT FIRED", FIRED the number of the call failed (0: none yet), so the caller
 * learns how many calls an operation makes and whether the fault was reached.
 *
 * Wrapped: write, pwrite, pwrite64, writev, pwritev (write); fsync, fdatasync (sync); rename, renameat, renameat2
 * (rename). strace of an upsert, an ingest, a snapshot and an optimize shows these are the calls that change files:
 * SQLite writes with pwrite64 and syncs with fdatasync (directories too), Python writes with write, syncs with fsync
 * and os.replace is rename.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum op { OP_WRITE = 1, OP_SYNC = 2, OP_RENAME = 4 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char fault_dir[PATH_MAX];
static size_t fault_dir_len;
static const char *control_path;
static const char *count_path;
static long generation = -1;
static long counted;
static long fired;

__attribute__((constructor)) static void init(void) {
    const char *dir = getenv("FAULT_DIR");
    control_path = getenv("FAULT_CONTROL");
    count_path = getenv("FAULT_COUNT");
    if (dir && *dir && strlen(dir) < sizeof(fault_dir) - 1) {
        strcpy(fault_dir, dir);
        fault_dir_len = strlen(fault_dir);
        while (fault_dir_len > 1 && fault_dir[fault_dir_len - 1] == '/')
            fault_dir[--fault_dir_len] = '\0';
    }
}

static int under_dir(const char *path) {
    return fault_dir_len && strncmp(path, fault_dir, fault_dir_len) == 0 &&
           (path[fault_dir_len] == '/' || path[fault_dir_len] == '\0');
}

static int fd_under_dir(int fd) {
    char link[64], target[PATH_MAX];
    if (!fault_dir_len || fd < 0)
        return 0;
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof(target) - 1);
    if (n <= 0)
        return 0;
    target[n] = '\0';
    return under_dir(target);
}

/* ``path`` made absolute against ``dirfd`` (AT_FDCWD: the working directory); 0 when it cannot be. */
static int absolute(int dirfd, const char *path, char *out, size_t size) {
    char base[PATH_MAX];
    if (!path)
        return 0;
    if (path[0] == '/')
        return snprintf(out, size, "%s", path) < (int)size;
    if (dirfd == AT_FDCWD) {
        if (!getcwd(base, sizeof(base)))
            return 0;
    } else {
        char link[64];
        snprintf(link, sizeof(link), "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(link, base, sizeof(base) - 1);
        if (n <= 0)
            return 0;
        base[n] = '\0';
    }
    return snprintf(out, size, "%s/%s", base, path) < (int)size;
}

static int path_under_dir(int dirfd, const char *path) {
    char full[PATH_MAX * 2];
    return fault_dir_len && absolute(dirfd, path, full, sizeof(full)) && under_dir(full);
}

static void record(void) {
    char line[96];
    int n = snprintf(line, sizeof(line), "%ld %ld %ld\n", generation, counted, fired);
    int fd = (int)syscall(SYS_openat, AT_FDCWD, count_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
        syscall(SYS_write, fd, line, (size_t)n);
        syscall(SYS_close, fd);
    }
}

/* Whether this call (of class ``op``, on a file under FAULT_DIR) is to fail; sets errno when it is. */
static int should_fail(enum op op) {
    char text[256];
    long gen, at;
    int err, persist, ops = 0;
    char names[128];
    if (!control_path)
        return 0;
    int fd = (int)syscall(SYS_openat, AT_FDCWD, control_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = syscall(SYS_read, fd, text, sizeof(text) - 1);
    syscall(SYS_close, fd);
    if (n <= 0)
        return 0;
    text[n] = '\0';
    if (sscanf(text, "%ld %ld %d %d %127s", &gen, &at, &err, &persist, names) != 5)
        return 0;
    if (strstr(names, "write"))
        ops |= OP_WRITE;
    if (strstr(names, "sync"))
        ops |= OP_SYNC;
    if (strstr(names, "rename"))
        ops |= OP_RENAME;
    if (!(ops & op))
        return 0;
    int fail = 0;
    pthread_mutex_lock(&lock);
    if (gen != generation) {
        generation = gen;
        counted = 0;
        fired = 0;
    }
    counted++;
    if (at > 0 && (counted == at || (persist && counted >= at))) {
        fail = 1;
        if (!fired)
            fired = counted;
    }
    if (count_path)
        record();
    pthread_mutex_unlock(&lock);
    if (fail)
        errno = err;
    return fail;
}

#define REAL(name) static __typeof__(name) *real_##name; if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    if (fd_under_dir(fd) && should_fail(OP_WRITE))
        return -1;
    return real_write(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite);
    if (fd_under_dir(fd) && should_fail(OP_WRITE))
        return -1;
    return real_pwrite(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    REAL(pwrite64);
    if (fd_under_dir(fd) && should_fail(OP_WRITE))
        return -1;
    return real_pwrite64(fd, buf, count, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev);
    if (fd_under_dir(fd) && should_fail(OP_WRITE))
        return -1;
    return real_writev(fd, iov, iovcnt);
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    REAL(pwritev);
    if (fd_under_dir(fd) && should_fail(OP_WRITE))
        return -1;
    return real_pwritev(fd, iov, iovcnt, offset);
}

int fsync(int fd) {
    REAL(fsync);
    if (fd_under_dir(fd) && should_fail(OP_SYNC))
        return -1;
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    if (fd_under_dir(fd) && should_fail(OP_SYNC))
        return -1;
    return real_fdatasync(fd);
}

int rename(const char *oldpath, const char *newpath) {
    REAL(rename);
    if ((path_under_dir(AT_FDCWD, oldpath) || path_under_dir(AT_FDCWD, newpath)) && should_fail(OP_RENAME))
        return -1;
    return real_rename(oldpath, newpath);
}

int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    REAL(renameat);
    if ((path_under_dir(olddirfd, oldpath) || path_under_dir(newdirfd, newpath)) && should_fail(OP_RENAME))
        return -1;
    return real_renameat(olddirfd, oldpath, newdirfd, newpath);
}

int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags) {
    REAL(renameat2);
    if ((path_under_dir(olddirfd, oldpath) || path_under_dir(newdirfd, newpath)) && should_fail(OP_RENAME))
        return -1;
    return real_renameat2(olddirfd, oldpath, newdirfd, newpath, flags);
}
