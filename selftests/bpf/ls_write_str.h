/* SPDX-License-Identifier: GPL-2.0 */
/* User space of the ls_defer_* tests and benches: write a sysfs/debugfs file. */
#ifndef __LS_WRITE_STR_H
#define __LS_WRITE_STR_H

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

/* Writes s to path in one write(); 0, or a negative errno. */
static inline int ls_write_str(const char *path, const char *s)
{
	int fd, n, err = 0;

	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	n = write(fd, s, strlen(s));
	if (n < 0)
		err = -errno;
	else if (n != (int)strlen(s))
		err = -EIO;
	close(fd);
	return err;
}

#endif /* __LS_WRITE_STR_H */
