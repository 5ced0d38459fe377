from collections.abc import Sequence

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
