/*
 * cmdgate.agent._spawn: start one command, born inside its cgroup.
 *
 * Python's subprocess cannot place a child in a cgroup, and the agent moving
 * itself in and out for each spawn is slow: a cgroup v2 migration of a
 * multi-threaded process (gRPC has threads) waits for an RCU grace period,
 * about 0.15 ms each way and up to 10 ms while connections are being set up.
 * Here the child is born in the run's cgroup v2 (clone3 with CLONE_INTO_CGROUP,
 * which migrates nothing), and it joins any other cgroup itself (the cgroup v1
 * pids hierarchy of a hybrid host), between the clone and execve(), while it
 * runs only this file's code: it cannot fork before it is inside, and the
 * agent never leaves its own cgroup. Where clone3 cannot do that (an older
 * kernel, another architecture), the child joins its cgroup v2 itself as well.
 *
 * The clone is vfork-like (CLONE_VM | CLONE_VFORK): copying the agent's page
 * tables would cost a millisecond. The child runs on the parent's memory and
 * stack, so until execve() it makes raw system calls only. setgroups,
 * setresgid and setresuid go through syscall(): glibc's wrappers would signal
 * every thread of the parent to change their ids too.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif

/* The kernel's struct clone_args, up to ``cgroup`` (CLONE_ARGS_SIZE_VER2). */
struct clone3_args {
    unsigned long long flags, pidfd, child_tid, parent_tid, exit_signal;
    unsigned long long stack, stack_size, tls, set_tid, set_tid_size, cgroup;
};

/*
 * clone3 on the caller's stack, like vfork(): the child returns first and may
 * reuse the stack below, so the return address is kept in a register and put
 * back before each return (x86-64), or never leaves one (arm64). Shadow-stack
 * builds would reject the re-pushed return address: they use plain vfork().
 */
#if defined(__x86_64__) && !(defined(__CET__) && (__CET__ & 2))
#define HAVE_CLONE3_VFORK 1
__asm__(
    ".text\n"
    ".globl cmdgate_clone3_vfork\n"
    ".hidden cmdgate_clone3_vfork\n"
    ".type cmdgate_clone3_vfork, @function\n"
    "cmdgate_clone3_vfork:\n"
    "    popq %r9\n"
    "    movl $435, %eax\n"
    "    syscall\n"
    "    pushq %r9\n"
    "    ret\n"
    ".size cmdgate_clone3_vfork, .-cmdgate_clone3_vfork\n");
#elif defined(__aarch64__)
#define HAVE_CLONE3_VFORK 1
__asm__(
    ".text\n"
    ".globl cmdgate_clone3_vfork\n"
    ".hidden cmdgate_clone3_vfork\n"
    ".type cmdgate_clone3_vfork, %function\n"
    "cmdgate_clone3_vfork:\n"
    "    mov x8, #435\n"
    "    svc #0\n"
    "    ret\n"
    ".size cmdgate_clone3_vfork, .-cmdgate_clone3_vfork\n");
#endif

#ifdef HAVE_CLONE3_VFORK
/* the new pid, 0 in the child, or -errno */
extern long cmdgate_clone3_vfork(struct clone3_args *args, size_t size)
    __attribute__((returns_twice, visibility("hidden")));
/* set once the kernel has said it has no clone3 */
static int clone3_missing;
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
    "setgroups", "setgid", "setuid", "close_range", "execve",
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
child_fail(int fd, int stage)
{
    struct failure report = {stage, errno};
    ssize_t ignored = write(fd, &report, sizeof report);
    (void)ignored;
    _exit(127);
}

/* Runs in the vfork child: raw system calls only, then execve or _exit. */
static void _Py_NO_RETURN
child_exec(const struct child_plan *plan)
{
    int fd = plan->error_fd;
    /* the kernel's struct sigaction; SIG_DFL is 0, so all zeros whatever the field order */
    struct { unsigned long handler, flags, restorer, mask; } dfl;
    sigset_t none;

    /* every handler and ignored signal of the agent's back to the default (an ignored
     * signal would survive execve), glibc's own two included: raw rt_sigaction */
    memset(&dfl, 0, sizeof dfl);
    for (int sig = 1; sig <= 64; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        if (syscall(SYS_rt_sigaction, sig, &dfl, NULL, (size_t)8) != 0)
            child_fail(fd, STAGE_SIGNALS);
    }
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) != 0)
        child_fail(fd, STAGE_SIGNALS);

    /* contained before it runs a single instruction of the command */
    if (plan->self_join >= 0 && write(plan->self_join, "0", 1) != 1)
        child_fail(fd, STAGE_CGROUP);
    for (Py_ssize_t i = 0; i < plan->n_join_fds; i++)
        if (write(plan->join_fds[i], "0", 1) != 1)
            child_fail(fd, STAGE_CGROUP);

    if (setsid() < 0)
        child_fail(fd, STAGE_SETSID);

    for (int target = 0; target < 3; target++) {
        int source = plan->stdio[target];
        if (source == target) {
            int flags = fcntl(source, F_GETFD);
            if (flags < 0 || fcntl(source, F_SETFD, flags & ~FD_CLOEXEC) < 0)
                child_fail(fd, STAGE_FDS);
        } else if (dup2(source, target) < 0) {
            child_fail(fd, STAGE_FDS);
        }
    }

    if (chdir(plan->cwd) != 0)
        child_fail(fd, STAGE_CHDIR);

    if (plan->switch_user) {
        if (syscall(SYS_setgroups, (size_t)plan->n_groups, plan->groups) != 0)
            child_fail(fd, STAGE_GROUPS);
        if (syscall(SYS_setresgid, plan->gid, plan->gid, plan->gid) != 0)
            child_fail(fd, STAGE_GID);
        if (syscall(SYS_setresuid, plan->uid, plan->uid, plan->uid) != 0)
            child_fail(fd, STAGE_UID);
    }

    /* fds 0, 1 and 2 only; the error pipe closes itself at execve (O_CLOEXEC) */
    if (fd > 3 && syscall(SYS_close_range, 3u, (unsigned int)fd - 1, 0u) != 0)
        child_fail(fd, STAGE_CLOSE);
    if (syscall(SYS_close_range, (unsigned int)fd + 1, ~0u, 0u) != 0)
        child_fail(fd, STAGE_CLOSE);

    execve(plan->path, plan->argv, plan->envp);
    child_fail(fd, STAGE_EXEC);
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

/* The child's pid once it has called execve or _exit, or -1 and ``*error``. */
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
    if (plan->cgroup_dir >= 0 && !clone3_missing) {
        long made = clone_into_cgroup(plan);
        tried = 1;
        if (made > 0) {
            pid = (pid_t)made;
        } else if (made == -ENOSYS || made == -E2BIG || made == -EINVAL) {
            /* no clone3, or none into a cgroup (before Linux 5.7) */
            if (made != -EINVAL)
                clone3_missing = 1;
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

/* A NULL-terminated array of the bytes in ``seq``, pointing into ``keep``'s items. */
static char **
string_array(PyObject *seq, const char *what, PyObject **keep)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    char **array = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (array == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
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
    *keep = fast;
    return array;
fail:
    PyMem_Free(array);
    Py_DECREF(fast);
    return NULL;
}

static int
int_array(PyObject *seq, const char *what, int **out, Py_ssize_t *count)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    int *array = PyMem_Calloc((size_t)n + 1, sizeof(int));
    if (array == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long value = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (value == -1 && PyErr_Occurred())
            goto fail;
        if (value < 0 || value > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: out of range", what);
            goto fail;
        }
        array[i] = (int)value;
    }
    Py_DECREF(fast);
    *out = array;
    *count = n;
    return 0;
fail:
    PyMem_Free(array);
    Py_DECREF(fast);
    return -1;
}

PyDoc_STRVAR(spawn_doc,
"spawn(path, argv, env, cwd, stdin, stdout, stderr, cgroup, join, user) -> pid\n\
\n\
Start ``path`` with ``argv`` and exactly ``env`` (bytes ``NAME=value``) in a new\n\
session, with the three fds as its 0, 1 and 2 and no others, in ``cwd``.\n\
``cgroup`` is None or the fds ``(directory, cgroup.procs)`` of a cgroup v2 the\n\
child is born in. Before anything else the child writes itself into each\n\
``cgroup.procs`` fd of ``join``. ``user`` is None or ``(uid, gid, groups)``.\n\
Returns once the command is executing; raises OSError (``strerror`` names the\n\
step) if it is not.");

static PyObject *
spawn(PyObject *module, PyObject *args)
{
    PyObject *path_obj, *argv_obj, *env_obj, *cwd_obj, *cgroup_obj, *join_obj, *user_obj;
    PyObject *path = NULL, *cwd = NULL, *argv_keep = NULL, *env_keep = NULL;
    char **argv = NULL, **envp = NULL;
    int *join_fds = NULL, *group_ints = NULL;
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
    plan.cgroup_dir = plan.cgroup_procs = -1;
    if (cgroup_obj != Py_None &&
        !PyArg_ParseTuple(cgroup_obj, "ii:cgroup", &plan.cgroup_dir, &plan.cgroup_procs))
        return NULL;
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
    if (int_array(join_obj, "join", &join_fds, &plan.n_join_fds) < 0)
        goto done;
    plan.join_fds = join_fds;
    if (user_obj != Py_None) {
        unsigned int uid, gid;
        PyObject *group_seq;
        Py_ssize_t n_groups;
        if (!PyArg_ParseTuple(user_obj, "IIO:user", &uid, &gid, &group_seq))
            goto done;
        if (int_array(group_seq, "groups", &group_ints, &n_groups) < 0)
            goto done;
        groups = PyMem_Calloc((size_t)n_groups + 1, sizeof(gid_t));
        if (groups == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < n_groups; i++)
            groups[i] = (gid_t)group_ints[i];
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
    plan.error_fd = error_pipe[1];

    pid_t pid;
    int saved_errno;
    Py_BEGIN_ALLOW_THREADS
    pid = start_child(&plan, &saved_errno);
    Py_END_ALLOW_THREADS
    close(error_pipe[1]);
    error_pipe[1] = -1;
    if (pid < 0) {
        errno = saved_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }

    /* the child has called execve or _exit by now: the pipe is closed or holds a report */
    struct failure report;
    ssize_t got;
    do {
        got = read(error_pipe[0], &report, sizeof report);
    } while (got < 0 && errno == EINTR);
    if (got == (ssize_t)sizeof report) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        const char *stage = report.stage > 0 && report.stage <= STAGE_EXEC
            ? stage_names[report.stage] : "?";
        char message[160];
        if (report.stage == STAGE_EXEC)
            snprintf(message, sizeof message, "%s", strerror(report.error));
        else
            snprintf(message, sizeof message, "%s: %s", stage, strerror(report.error));
        /* OSError(errno, message): FileNotFoundError, PermissionError... */
        PyObject *exc_args = Py_BuildValue("(is)", report.error, message);
        if (exc_args != NULL) {
            PyErr_SetObject(PyExc_OSError, exc_args);
            Py_DECREF(exc_args);
        }
        goto done;
    }
    result = PyLong_FromLong((long)pid);

done:
    if (error_pipe[0] >= 0)
        close(error_pipe[0]);
    if (error_pipe[1] >= 0)
        close(error_pipe[1]);
    PyMem_Free(groups);
    PyMem_Free(group_ints);
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
    return PyModule_Create(&module);
}
