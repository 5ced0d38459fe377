from collections.abc import Sequence

# 1 if this build can have a child born in its cgroup (clone3), else 0
CLONE_INTO_CGROUP: int

def spawn(
    path: bytes,
    argv: Sequence[bytes],
    env: Sequence[bytes],
    cwd: bytes,
    stdin: int,
    stdout: int,
    stderr: int,
    cgroup: tuple[int, int] | None,
    join: Sequence[int],
    user: tuple[int, int, Sequence[int]] | None,
    /,
) -> int: ...
