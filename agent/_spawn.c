/*
 * cmdgate.agent._spawn: start one command, born inside its cgroup.
 *
 * Python's subprocess cannot place a child in a cgroup, and the agent moving
 * itself in and out for each spawn is slow: every cgroup migration waits for
 * the kernel's RCU grace period once the host has been idle (up to 20 ms).
 * Here the child is born in the run's cgroup v2 (clone3 with CLONE_INTO_CGROUP,
 * which migrates nothing), and it joins any other cgroup itself (the cgroup v1
 * pids hierarchy of a hybrid host), between the clone and execve(), while it
 * runs only this file's code: it cannot fork before it is inside, and the
 * agent never leaves its own cgroup. Where clone3 cannot do that (an older
 * kernel, a seccomp filter, a shadow-stack build, another architecture), the
 * child joins its cgroup v2 itself as well.
 *
 * The clone is vfork-like (CLONE_VM | CLONE_VFORK): copying the agent's page
 * tables would cost a millisecond. The child runs on the parent's memory and
 * stack, so until execve() it makes raw system calls only (glibc's wrappers
 * may touch the parent thread's state: setresuid's signals every thread to
 * change ids too, write's marks the thread as cancellable).
 *
 * Linux on x86-64 and arm64 only: the raw calls assume 32-bit ids and 64
 * signals.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#if !defined(__x86_64__) && !defined(__aarch64__)
#error "cmdgate's spawn is written for Linux on x86-64 and arm64"
#endif

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

/* The kernel's struct clone_args, up to ``cgroup`` (CLONE_ARGS_SIZE_VER2). */
struct clone3_args {
    unsigned long long flags, pidfd, child_tid, parent_tid, exit_signal;
    unsigned long long stack, stack_size, tls, set_tid, set_tid_size, cgroup;
};

/*
 * clone3 on the caller's stack, like vfork(): the child returns first and may
 * reuse the stack below, so the return address is kept in a register and put
 * back before each return (x86-64), or never leaves one (arm64). A shadow stack
 * (x86 CET, arm64 GCS) would reject that: such builds use plain vfork().
 */
#if defined(__x86_64__) && !(defined(__CET__) && (__CET__ & 2))
#define HAVE_CLONE3_VFORK 1
__asm__(
    ".pushsection .text\n"
    ".globl cmdgate_clone3_vfork\n"
    ".hidden cmdgate_clone3_vfork\n"
    ".type cmdgate_clone3_vfork, @function\n"
    "cmdgate_clone3_vfork:\n"
    "    popq %r9\n"
    "    movl $435, %eax\n"
    "    syscall\n"
    "    pushq %r9\n"
    "    ret\n"
    ".size cmdgate_clone3_vfork, .-cmdgate_clone3_vfork\n"
    ".popsection\n");
#elif defined(__aarch64__) && !defined(__ARM_FEATURE_GCS_DEFAULT)
#define HAVE_CLONE3_VFORK 1
__asm__(
    ".pushsection .text\n"
    ".globl cmdgate_clone3_vfork\n"
    ".hidden cmdgate_clone3_vfork\n"
    ".type cmdgate_clone3_vfork, %function\n"
    "cmdgate_clone3_vfork:\n"
    "    mov x8, #435\n"
    "    svc #0\n"
    "    ret\n"
    ".size cmdgate_clone3_vfork, .-cmdgate_clone3_vfork\n"
    ".popsection\n");
#endif

#ifdef HAVE_CLONE3_VFORK
/* the new pid, 0 in the child, or -errno */
extern long cmdgate_clone3_vfork(struct clone3_args *args, size_t size)
    __attribute__((returns_twice, visibility("hidden")));
/* set once the kernel has refused clone3 into a cgroup (spawns may run on several threads) */
static int clone3_refused;
#endif

/* Where the child failed, reported to the parent through the error pipe. */
enum stage {
    STAGE_SIGNALS = 1,
    STAGE_CGROUP,
    STAGE_SETSID,
    STAGE_FDS,
    STAGE_CHDIR,
    STAGE_GROUPS,
    STAGE_GID,
    STAGE_UID,
    STAGE_CLOSE,
    STAGE_EXEC,
};

static const char *stage_names[] = {
    "", "signals", "cgroup", "setsid", "file descriptors", "chdir",
    "setgroups", "setgid", "setuid", "closing descriptors", "execve",
};

struct failure {
    int stage;
    int error;
};

struct child_plan {
    const char *path;
    char *const *argv;
    char *const *envp;
    const char *cwd;
    int stdio[3];
    int cgroup_dir;    /* the run's cgroup v2, to be born in; -1 for none */
    int cgroup_procs;  /* its cgroup.procs, to join when clone3 cannot */
    int self_join;     /* cgroup_procs if the child must join it itself, else -1 */
    const int *join_fds;
    Py_ssize_t n_join_fds;
    int switch_user;
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
    Py_ssize_t n_groups;
    int error_fd;
};

static void _Py_NO_RETURN
child_fail(int fd, int stage, int error)
{
    struct failure report = {stage, error ? error : EIO};
    syscall(SYS_write, fd, &report, sizeof report);
    syscall(SYS_exit_group, 127);
    for (;;)
        ;
}

/* Close every descriptor from 3 up but ``keep``, where close_range is missing or filtered. */
static int
close_all_but(int keep)
{
    char buffer[4096];
    int dir = (int)syscall(SYS_openat, AT_FDCWD, "/proc/self/fd",
                           O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0)
        return -1;
    for (;;) {
        long got = syscall(SYS_getdents64, dir, buffer, sizeof buffer);
        if (got < 0)
            return -1;
        if (got == 0)
            break;
        for (long at = 0; at < got;) {
            struct dirent64 *entry = (struct dirent64 *)(buffer + at);
            int fd = 0, digits = 0;
            for (const char *c = entry->d_name; *c >= '0' && *c <= '9'; c++, digits++)
                fd = fd * 10 + (*c - '0');
            if (digits > 0 && fd > 2 && fd != keep && fd != dir)
                syscall(SYS_close, fd);
            at += entry->d_reclen;
        }
    }
    syscall(SYS_close, dir);
    return 0;
}

/* Runs in the vfork child: raw system calls only, then execve or exit. */
static void _Py_NO_RETURN
child_exec(const struct child_plan *plan)
{
    int fd = plan->error_fd;
    /* the kernel's struct sigaction; SIG_DFL is 0, so all zeros whatever the field order */
    struct { unsigned long handler, flags, restorer, mask; } dfl;
    unsigned long none = 0;

    /* every handler and ignored signal of the agent's back to the default (an ignored
     * signal would survive execve), glibc's own two included */
    memset(&dfl, 0, sizeof dfl);
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        if (syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof none) != 0)
            child_fail(fd, STAGE_SIGNALS, errno);
    }
    if (syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, sizeof none) != 0)
        child_fail(fd, STAGE_SIGNALS, errno);

    /* contained before it runs a single instruction of the command */
    if (plan->self_join >= 0 && syscall(SYS_write, plan->self_join, "0", 1) != 1)
        child_fail(fd, STAGE_CGROUP, errno);
    for (Py_ssize_t i = 0; i < plan->n_join_fds; i++)
        if (syscall(SYS_write, plan->join_fds[i], "0", 1) != 1)
            child_fail(fd, STAGE_CGROUP, errno);

    if (syscall(SYS_setsid) < 0)
        child_fail(fd, STAGE_SETSID, errno);

    for (int target = 0; target < 3; target++) {
        int source = plan->stdio[target];
        if (source == target) {
            if (syscall(SYS_fcntl, source, F_SETFD, 0) < 0)
                child_fail(fd, STAGE_FDS, errno);
        } else if (syscall(SYS_dup3, source, target, 0) < 0) {
            child_fail(fd, STAGE_FDS, errno);
        }
    }

    if (syscall(SYS_chdir, plan->cwd) != 0)
        child_fail(fd, STAGE_CHDIR, errno);

    if (plan->switch_user) {
        if (syscall(SYS_setgroups, (size_t)plan->n_groups, plan->groups) != 0)
            child_fail(fd, STAGE_GROUPS, errno);
        if (syscall(SYS_setresgid, plan->gid, plan->gid, plan->gid) != 0)
            child_fail(fd, STAGE_GID, errno);
        if (syscall(SYS_setresuid, plan->uid, plan->uid, plan->uid) != 0)
            child_fail(fd, STAGE_UID, errno);
    }

    /* fds 0, 1 and 2 only; the error pipe (fd 3 or above) closes itself at execve */
    int closed = (fd == 3 || syscall(SYS_close_range, 3u, (unsigned int)fd - 1, 0u) == 0) &&
                 syscall(SYS_close_range, (unsigned int)fd + 1, ~0u, 0u) == 0;
    if (!closed && close_all_but(fd) != 0)
        child_fail(fd, STAGE_CLOSE, errno);

    syscall(SYS_execve, plan->path, plan->argv, plan->envp);
    child_fail(fd, STAGE_EXEC, errno);
}

#ifdef HAVE_CLONE3_VFORK
/* Each clone in a frame of its own: nothing of the caller's can be clobbered by it. */
static __attribute__((noinline)) long
clone_into_cgroup(const struct child_plan *plan)
{
    struct clone3_args args;
    memset(&args, 0, sizeof args);
    args.flags = CLONE_VM | CLONE_VFORK | CLONE_INTO_CGROUP;
    args.exit_signal = SIGCHLD;
    args.cgroup = (unsigned long long)plan->cgroup_dir;
    long made = cmdgate_clone3_vfork(&args, sizeof args);
    if (made == 0)
        child_exec(plan);
    return made;
}
#endif

static __attribute__((noinline)) pid_t
plain_vfork(const struct child_plan *plan, int *error)
{
    pid_t pid = vfork();
    if (pid == 0)
        child_exec(plan);
    *error = errno;
    return pid;
}

/* The child's pid once it has called execve or exited, or -1 and ``*error``. */
static pid_t
start_child(struct child_plan *plan, int *error)
{
    sigset_t all, old;
    pid_t pid = -1;
    int tried = 0;

    /* no signal handler of the agent may run in the child, which shares its memory */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    plan->self_join = -1;
#ifdef HAVE_CLONE3_VFORK
    if (plan->cgroup_dir >= 0 && !__atomic_load_n(&clone3_refused, __ATOMIC_RELAXED)) {
        long made = clone_into_cgroup(plan);
        tried = 1;
        if (made > 0) {
            pid = (pid_t)made;
        } else if (made == -ENOSYS || made == -E2BIG || made == -EINVAL || made == -EPERM) {
            /* no clone3, none into a cgroup (before Linux 5.7), or a seccomp filter */
            __atomic_store_n(&clone3_refused, 1, __ATOMIC_RELAXED);
            tried = 0;
        } else {
            *error = (int)-made;
        }
    }
#endif
    if (!tried) {
        plan->self_join = plan->cgroup_procs;
        pid = plain_vfork(plan, error);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pid;
}

/* A NULL-terminated array of the bytes in ``seq``, pointing into the tuple ``*keep``. */
static char **
string_array(PyObject *seq, const char *what, PyObject **keep)
{
    /* a tuple of bytes: nothing another thread does can change it while the GIL is free */
    PyObject *items = PySequence_Tuple(seq);
    if (items == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    char **array = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (array == NULL) {
        Py_DECREF(items);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s: items must be bytes", what);
            goto fail;
        }
        char *text = PyBytes_AS_STRING(item);
        if ((size_t)PyBytes_GET_SIZE(item) != strlen(text)) {
            PyErr_Format(PyExc_ValueError, "%s: embedded null byte", what);
            goto fail;
        }
        array[i] = text;
    }
    *keep = items;
    return array;
fail:
    PyMem_Free(array);
    Py_DECREF(items);
    return NULL;
}

/* ``value`` as an id (uid or gid): 0 to 2**32 - 2; -1 would mean "unchanged". */
static int
id_value(PyObject *value, const char *what, unsigned int *out)
{
    unsigned long id = PyLong_AsUnsignedLong(value);
    if (id == (unsigned long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError) || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s: not an id from 0 to 4294967294", what);
        }
        return -1;
    }
    if (id >= UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: not an id from 0 to 4294967294", what);
        return -1;
    }
    *out = (unsigned int)id;
    return 0;
}

/* The ints of ``seq``, each a descriptor (0 or more). */
static int
fd_array(PyObject *seq, const char *what, int **out, Py_ssize_t *count)
{
    PyObject *items = PySequence_Tuple(seq);
    if (items == NULL)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    int *array = PyMem_Calloc((size_t)n + 1, sizeof(int));
    if (array == NULL) {
        Py_DECREF(items);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long value = PyLong_AsLong(PyTuple_GET_ITEM(items, i));
        if (value == -1 && PyErr_Occurred())
            goto fail;
        if (value < 0 || value > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: not a descriptor", what);
            goto fail;
        }
        array[i] = (int)value;
    }
    Py_DECREF(items);
    *out = array;
    *count = n;
    return 0;
fail:
    PyMem_Free(array);
    Py_DECREF(items);
    return -1;
}

PyDoc_STRVAR(spawn_doc,
"spawn(path, argv, env, cwd, stdin, stdout, stderr, cgroup, join, user) -> pid\n\
\n\
Start ``path`` with ``argv`` and exactly ``env`` (bytes ``NAME=value``) in a new\n\
session, with the three fds (each 3 or above) as its 0, 1 and 2 and no others,\n\
every signal at its default and none blocked, in ``cwd``. ``cgroup`` is None or\n\
the fds ``(directory, cgroup.procs)`` of a cgroup v2 the child is born in.\n\
Before anything else the child writes itself into each ``cgroup.procs`` fd of\n\
``join``. ``user`` is None or ``(uid, gid, groups)``. Returns once the command\n\
is executing; raises OSError (``strerror`` names the step) if it is not.");

static PyObject *
spawn(PyObject *module, PyObject *args)
{
    PyObject *path_obj, *argv_obj, *env_obj, *cwd_obj, *cgroup_obj, *join_obj, *user_obj;
    PyObject *path = NULL, *cwd = NULL, *argv_keep = NULL, *env_keep = NULL;
    char **argv = NULL, **envp = NULL;
    int *join_fds = NULL;
    gid_t *groups = NULL;
    struct child_plan plan;
    PyObject *result = NULL;
    int error_pipe[2] = {-1, -1};

    (void)module;
    memset(&plan, 0, sizeof plan);
    if (!PyArg_ParseTuple(args, "OOOOiiiOOO:spawn", &path_obj, &argv_obj, &env_obj, &cwd_obj,
                          &plan.stdio[0], &plan.stdio[1], &plan.stdio[2], &cgroup_obj,
                          &join_obj, &user_obj))
        return NULL;
    for (int i = 0; i < 3; i++)
        if (plan.stdio[i] < 3) {
            /* a low fd could be overwritten by the dup of another before it is used */
            PyErr_SetString(PyExc_ValueError, "stdin, stdout and stderr must be fds 3 or above");
            return NULL;
        }
    plan.cgroup_dir = plan.cgroup_procs = -1;
    if (cgroup_obj != Py_None) {
        if (!PyArg_ParseTuple(cgroup_obj, "ii:cgroup", &plan.cgroup_dir, &plan.cgroup_procs))
            return NULL;
        if (plan.cgroup_dir < 0 || plan.cgroup_procs < 0) {
            /* either way in is needed: without it the child would be in no cgroup */
            PyErr_SetString(PyExc_ValueError, "cgroup: needs its directory and cgroup.procs fds");
            return NULL;
        }
    }
    if (!PyUnicode_FSConverter(path_obj, &path) || !PyUnicode_FSConverter(cwd_obj, &cwd))
        goto done;
    if ((argv = string_array(argv_obj, "argv", &argv_keep)) == NULL ||
        (envp = string_array(env_obj, "env", &env_keep)) == NULL)
        goto done;
    if (argv[0] == NULL) {
        PyErr_SetString(PyExc_ValueError, "argv must not be empty");
        goto done;
    }
    plan.path = PyBytes_AS_STRING(path);
    plan.cwd = PyBytes_AS_STRING(cwd);
    if ((size_t)PyBytes_GET_SIZE(path) != strlen(plan.path) ||
        (size_t)PyBytes_GET_SIZE(cwd) != strlen(plan.cwd)) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        goto done;
    }
    plan.argv = argv;
    plan.envp = envp;
    if (fd_array(join_obj, "join", &join_fds, &plan.n_join_fds) < 0)
        goto done;
    plan.join_fds = join_fds;
    if (user_obj != Py_None) {
        PyObject *uid_obj, *gid_obj, *group_seq, *group_items;
        unsigned int uid, gid;
        if (!PyArg_ParseTuple(user_obj, "OOO:user", &uid_obj, &gid_obj, &group_seq) ||
            id_value(uid_obj, "uid", &uid) < 0 || id_value(gid_obj, "gid", &gid) < 0)
            goto done;
        if ((group_items = PySequence_Tuple(group_seq)) == NULL)
            goto done;
        Py_ssize_t n_groups = PyTuple_GET_SIZE(group_items);
        groups = PyMem_Calloc((size_t)n_groups + 1, sizeof(gid_t));
        if (groups == NULL) {
            Py_DECREF(group_items);
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < n_groups; i++) {
            unsigned int group;
            if (id_value(PyTuple_GET_ITEM(group_items, i), "groups", &group) < 0) {
                Py_DECREF(group_items);
                goto done;
            }
            groups[i] = (gid_t)group;
        }
        Py_DECREF(group_items);
        plan.switch_user = 1;
        plan.uid = (uid_t)uid;
        plan.gid = (gid_t)gid;
        plan.groups = groups;
        plan.n_groups = n_groups;
    }
    if (pipe2(error_pipe, O_CLOEXEC) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    for (int end = 0; end < 2; end++)
        if (error_pipe[end] < 3) {
            /* on 0, 1 or 2 it would be overwritten by the child's stdio */
            int high = fcntl(error_pipe[end], F_DUPFD_CLOEXEC, 3);
            close(error_pipe[end]);
            error_pipe[end] = high;
            if (high < 0) {
                PyErr_SetFromErrno(PyExc_OSError);
                goto done;
            }
        }
    plan.error_fd = error_pipe[1];

    pid_t pid;
    int saved_errno = 0;
    struct failure report = {0, 0};
    ssize_t got = 0;
    int status;
    Py_BEGIN_ALLOW_THREADS
    pid = start_child(&plan, &saved_errno);
    close(error_pipe[1]);
    error_pipe[1] = -1;
    if (pid > 0) {
        /* the child has called execve or exited by now: the pipe is closed or holds a report */
        do {
            got = read(error_pipe[0], &report, sizeof report);
        } while (got < 0 && errno == EINTR);
        if (got != 0) {
            if (got != (ssize_t)sizeof report) {
                /* no whole report: fail closed, whatever the child did */
                report.stage = STAGE_EXEC;
                report.error = got < 0 ? errno : EIO;
                kill(pid, SIGKILL);
            }
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
        }
    }
    Py_END_ALLOW_THREADS
    if (pid < 0) {
        errno = saved_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    if (got != 0) {
        const char *stage = report.stage > 0 && report.stage <= STAGE_EXEC
            ? stage_names[report.stage] : "?";
        char message[200];
        if (report.stage == STAGE_EXEC)
            snprintf(message, sizeof message, "%s", strerror(report.error));
        else
            snprintf(message, sizeof message, "%s: %s", stage, strerror(report.error));
        /* OSError(errno, message[, path]): FileNotFoundError, PermissionError... */
        PyObject *text = PyUnicode_DecodeLocale(message, "surrogateescape");
        PyObject *exc_args = text == NULL ? NULL
            : report.stage == STAGE_EXEC ? Py_BuildValue("(iNO)", report.error, text, path_obj)
                                         : Py_BuildValue("(iN)", report.error, text);
        if (exc_args != NULL) {
            PyErr_SetObject(PyExc_OSError, exc_args);
            Py_DECREF(exc_args);
        }
        goto done;
    }
    result = PyLong_FromLong((long)pid);
    if (result == NULL) {
        /* the command runs, and nobody would know its pid: end it */
        kill(pid, SIGKILL);
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
    }

done:
    if (error_pipe[0] >= 0)
        close(error_pipe[0]);
    if (error_pipe[1] >= 0)
        close(error_pipe[1]);
    PyMem_Free(groups);
    PyMem_Free(join_fds);
    PyMem_Free(argv);
    PyMem_Free(envp);
    Py_XDECREF(argv_keep);
    Py_XDECREF(env_keep);
    Py_XDECREF(path);
    Py_XDECREF(cwd);
    return result;
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS, spawn_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cmdgate.agent._spawn",
    .m_doc = "Start a command inside its cgroup, with no shell and nothing inherited.",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__spawn(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#ifdef HAVE_CLONE3_VFORK
    const int born_inside = 1;
#else
    const int born_inside = 0;
#endif
    /* whether this build can have a child born in its cgroup (else it joins it itself) */
    if (PyModule_AddIntConstant(m, "CLONE_INTO_CGROUP", born_inside) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
