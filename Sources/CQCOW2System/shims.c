#include "CQCOW2System.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/falloc.h>
#endif

int cqcow2_fallocate(int fd, int mode, int64_t offset, int64_t len) {
#ifdef __linux__
    return fallocate(fd, mode, (off_t)offset, (off_t)len);
#else
    (void)fd; (void)mode; (void)offset; (void)len;
    errno = EOPNOTSUPP;
    return -1;
#endif
}

int64_t cqcow2_lseek_data(int fd, int64_t offset) { return (int64_t)lseek(fd, (off_t)offset, SEEK_DATA); }
int64_t cqcow2_lseek_hole(int fd, int64_t offset) { return (int64_t)lseek(fd, (off_t)offset, SEEK_HOLE); }

static int ofd(int fd, short type, int64_t start, int64_t len) {
#ifdef F_OFD_SETLK
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)start;
    fl.l_len = (off_t)len;
    return fcntl(fd, F_OFD_SETLK, &fl);
#else
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)start;
    fl.l_len = (off_t)len;
    return fcntl(fd, F_SETLK, &fl);
#endif
}

int cqcow2_ofd_lock(int fd, int exclusive, int64_t start, int64_t len) {
    return ofd(fd, exclusive ? F_WRLCK : F_RDLCK, start, len);
}
int cqcow2_ofd_unlock(int fd, int64_t start, int64_t len) { return ofd(fd, F_UNLCK, start, len); }

#ifdef __linux__
const int cqcow2_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
const int cqcow2_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
const int cqcow2_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
#else
const int cqcow2_FALLOC_FL_KEEP_SIZE = 0;
const int cqcow2_FALLOC_FL_PUNCH_HOLE = 0;
const int cqcow2_FALLOC_FL_ZERO_RANGE = 0;
#endif

int cqcow2_ofd_test(int fd, int64_t start, int64_t len) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)start;
    fl.l_len = (off_t)len;
#ifdef F_OFD_GETLK
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) return -1;
#else
    if (fcntl(fd, F_GETLK, &fl) < 0) return -1;
#endif
    return fl.l_type == F_UNLCK ? 0 : 1;
}
