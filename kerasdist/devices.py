"""Device discovery and logical CPU devices for tests and demos."""

from __future__ import annotations

import tensorflow as tf

from kerasdist import _internals
from kerasdist._validate import check_int, env_int

__all__ = ["gpus", "local_devices", "virtual_cpus"]


def virtual_cpus(n: int) -> list[str]:
    """Splits the host CPU into `n` logical devices.

    Lets a machine without accelerators run `MirroredStrategy` (or a
    pipeline) over several devices, as tests and demos do. It must run
    before TensorFlow initialises its devices, i.e. before the first tensor,
    model or strategy is created. Calling it again with the same `n` is a
    no-op. `KERASDIST_VIRTUAL_CPUS` in the environment has the same effect
    for `kerasdist.flags` scripts.

    Args:
        n: int. Number of logical CPU devices, at least 1.

    Returns:
        list of str: the logical device names, e.g. `["/device:CPU:0",
        "/device:CPU:1"]`.

    Raises:
        ValueError: if `n` is not a positive integer.
        RuntimeError: if TensorFlow has already initialised a different
            number of CPU devices.

    Example:

    ```python
    import kerasdist as kd
    kd.virtual_cpus(2)          # first thing in the program
    strategy = kd.get_strategy("mirrored")
    ```
    """
    n = check_int("n", n)
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError:
        existing = tf.config.list_logical_devices("CPU")
        if len(existing) == n:
            return [d.name for d in existing]
        raise RuntimeError(
            f"kd.virtual_cpus({n}) was called after TensorFlow initialised "
            f"its devices with {len(existing)} CPU device(s); logical devices "
            "cannot be changed then. Call kd.virtual_cpus() at the start of "
            "the program, before creating any tensor, model or strategy (or "
            f"set KERASDIST_VIRTUAL_CPUS={n} in the environment)."
        ) from None
    # Not tf.config.list_logical_devices(): it would initialise the context,
    # after which MultiWorkerMirroredStrategy cannot configure its
    # collectives ("Collective ops must be configured at program startup").
    return [f"/device:CPU:{i}" for i in range(n)]


def apply_env_virtual_cpus() -> list[str] | None:
    """Applies `KERASDIST_VIRTUAL_CPUS` if set; returns the devices or None.

    Returns:
        list of str or None.

    Raises:
        ValueError: if the variable is not a positive integer.

    Example:

    >>> apply_env_virtual_cpus()  # KERASDIST_VIRTUAL_CPUS unset: no-op
    """
    count = env_int("KERASDIST_VIRTUAL_CPUS", minimum=1,
                    expected="a number of virtual CPUs")
    return None if count is None else virtual_cpus(count)


def gpus() -> list[str]:
    """Names of the logical GPU devices TensorFlow sees.

    Returns:
        list of str, empty on a CPU-only machine.

    Example:

    >>> isinstance(gpus(), list)
    True
    """
    return [d.name for d in tf.config.list_logical_devices("GPU")]


def local_devices() -> list[str]:
    """The devices a local strategy replicates over: GPUs, else CPUs.

    Returns:
        list of str.

    Example:

    >>> len(local_devices()) >= 1
    True
    """
    return gpus() or [d.name for d in tf.config.list_logical_devices("CPU")]


def check_devices(devices: list[str]) -> list[str]:
    """Validates that every named device exists on this host.

    Args:
        devices: list of str. Device names such as `"/cpu:1"` or `"GPU:0"`.

    Returns:
        The canonical device names, in order.

    Raises:
        ValueError: naming the first device that does not exist and listing
            the ones that do.

    Example:

    >>> check_devices(["/cpu:0"])
    ['/job:localhost/replica:0/task:0/device:CPU:0']
    """
    available = {
        d.name: d
        for d in tf.config.list_logical_devices()
        if d.device_type in ("CPU", "GPU", "TPU")
    }
    short = {
        f"{d.device_type}:{n.rsplit(':', 1)[-1]}".lower(): n
        for n, d in available.items()
    }
    out = []
    for device in devices:
        if not isinstance(device, str):
            raise ValueError(
                f"Invalid device {device!r}: expected a device name string "
                "such as '/gpu:0'."
            )
        spec = tf.DeviceSpec.from_string(device)
        if spec.device_type is None:
            raise ValueError(
                f"Device {device!r} names no device type. Expected e.g. "
                f"'/cpu:0' or '/gpu:1'. Available: {sorted(short)}."
            )
        key = f"{spec.device_type}:{spec.device_index or 0}".lower()
        if key not in short:
            raise ValueError(
                f"Device {device!r} does not exist on this host. Available: "
                f"{sorted(short)}. To test on CPUs, call kd.virtual_cpus(n) "
                "at program start."
            )
        # This process's own address space: "/job:localhost/replica:0/task:0"
        # alone, "/job:worker/replica:0/task:<i>" once a multi-worker
        # strategy started its server (no public API gives it).
        out.append(
            f"{_internals.host_address_space()}/device:"
            f"{spec.device_type.upper()}:{spec.device_index or 0}"
        )
    return out
