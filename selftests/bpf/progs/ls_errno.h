/* SPDX-License-Identifier: GPL-2.0 */
/* The errno values the ls_defer_* and bench BPF programs compare with. */
#ifndef __PROGS_LS_ERRNO_H
#define __PROGS_LS_ERRNO_H

#ifndef ENOENT
#define ENOENT		2
#endif
#ifndef ENOMEM
#define ENOMEM		12
#endif
#ifndef EBUSY
#define EBUSY		16
#endif
#ifndef EDEADLK
#define EDEADLK		35
#endif
#ifndef EOPNOTSUPP
#define EOPNOTSUPP	95
#endif
#ifndef ETIMEDOUT
#define ETIMEDOUT	110
#endif

#endif /* __PROGS_LS_ERRNO_H */
