"""Stage devices: local ones, or the devices of a joined cluster's tasks."""

from __future__ import annotations

import tensorflow as tf

from kerasdist import devices as devices_lib

__all__ = ["check_devices"]


def check_devices(devices: list[str]) -> list[str]:
    """Canonical names of `devices`, local or of a joined cluster's tasks.

    A device naming a job (`/job:worker/replica:0/task:1/device:CPU:0`, as
    `kd.placement.join_cluster()` returns) must be one of the cluster's
    devices; others are checked on this host (`kd.devices.check_devices`).

    Args:
        devices: list of str.

    Returns:
        list of str, the fully qualified device names.

    Raises:
        ValueError: naming the first device that does not exist.
    """
    out = []
    for device in devices:
        if isinstance(device, list | tuple):
            raise ValueError(
                f"Invalid device {device!r}: a list, in devices={devices!r}. "
                "Expected one device name per stage; for R pipeline "
                "replicas (a list of device lists), use "
                "kd.placement.HybridPipelineModel."
            )
        spec = (
            tf.DeviceSpec.from_string(device)
            if isinstance(device, str) else None
        )
        if spec is None or spec.job in (None, "localhost"):
            out.extend(devices_lib.check_devices([device]))
            continue
        name = (
            f"/job:{spec.job}/replica:{spec.replica or 0}/task:"
            f"{spec.task or 0}/device:{(spec.device_type or 'CPU').upper()}:"
            f"{spec.device_index or 0}"
        )
        available = sorted(
            d.name for d in tf.config.list_logical_devices()
            if d.name.startswith("/job:")
        )
        if name not in available:
            raise ValueError(
                f"Device {device!r} does not exist in this cluster. "
                f"Available: {available}. Expected one of the devices "
                "kd.placement.join_cluster() returned (call it first, on "
                "every worker)."
            )
        out.append(name)
    return out
