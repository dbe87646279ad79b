#ifndef CQCOW2SYSTEM_H
#define CQCOW2SYSTEM_H
#include <stdint.h>
#include <sys/types.h>

/// Thin wrappers over Linux calls that Swift's Glibc module does not import.
int cqcow2_fallocate(int fd, int mode, int64_t offset, int64_t len);
int64_t cqcow2_lseek_data(int fd, int64_t offset);
int64_t cqcow2_lseek_hole(int fd, int64_t offset);
/// Take (or test) an OFD byte-range lock: `exclusive` 1 = write lock, 0 = read lock.
/// Returns 0 on success, -1 with errno (EAGAIN/EACCES when another holder conflicts).
int cqcow2_ofd_lock(int fd, int exclusive, int64_t start, int64_t len);
int cqcow2_ofd_unlock(int fd, int64_t start, int64_t len);
/// 1 when another open file description holds a lock on the byte range that conflicts
/// with a write lock, 0 when not, -1 on error.
int cqcow2_ofd_test(int fd, int64_t start, int64_t len);
extern const int cqcow2_FALLOC_FL_KEEP_SIZE;
extern const int cqcow2_FALLOC_FL_PUNCH_HOLE;
extern const int cqcow2_FALLOC_FL_ZERO_RANGE;
#endif
