"""Per-rank GPU telemetry for the benchmarks: NVML memory, utilisation and power sampled in a thread, and torch's
peak allocated memory. Without a GPU (or without NVML) it reports what it can and the benchmark carries on.

The NVML device is found by UUID (torch's device index is not NVML's under CUDA_VISIBLE_DEVICES), NVML is shut down
after each sampling window, and a metric the device does not support (NVMLError_NotSupported, e.g. power on some
virtual GPUs) is dropped alone while the others are still sampled.
"""
import statistics
import threading

import torch

METRICS = ("mem", "util", "power")


def torch_uuid(device: torch.device) -> str:
    """The UUID of torch's device, as NVML spells it without its GPU-/MIG- prefix (lower case)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return normalise_uuid(str(torch.cuda.get_device_properties(index).uuid))


def normalise_uuid(uuid) -> str:
    if isinstance(uuid, bytes):
        uuid = uuid.decode()
    uuid = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if uuid.startswith(prefix):
            uuid = uuid[len(prefix):]
    return uuid


def nvml_handle(nv, uuid: str):
    """The NVML handle of the device whose UUID is `uuid` (normalised); LookupError naming what NVML sees."""
    seen = []
    for i in range(nv.nvmlDeviceGetCount()):
        handle = nv.nvmlDeviceGetHandleByIndex(i)
        other = normalise_uuid(nv.nvmlDeviceGetUUID(handle))
        if other == uuid:
            return handle
        seen.append(other)
    raise LookupError(f"no NVML device has torch's UUID {uuid} (NVML sees {', '.join(seen) or 'no device'})")


def _read(nv, handle, metric):
    if metric == "mem":
        return nv.nvmlDeviceGetMemoryInfo(handle).used
    if metric == "util":
        return nv.nvmlDeviceGetUtilizationRates(handle).gpu
    return nv.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW -> W


def _allocator_peak_mb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20


class GpuMonitor:
    """`with GpuMonitor(device): ...` samples NVML every `period` seconds; summary() gives gpu_* fields."""

    def __init__(self, device: torch.device, period: float = 0.05):
        self.device, self.period = device, period
        self.samples = {m: [] for m in METRICS}
        self.unsupported, self.note, self.nv, self.handle = set(), None, None, None
        if device.type != "cuda":
            self.note = "no GPU"
            return
        try:
            import pynvml
            self.nv = pynvml
        except ImportError as e:
            self.note = f"NVML unavailable ({type(e).__name__}: {e})"

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _open(self) -> bool:
        """Initialise NVML and find torch's device in it; False (with a note) when that fails."""
        if self.nv is None:
            return False
        try:
            self.nv.nvmlInit()
        except Exception as e:  # no driver library, no permission
            self.note = f"NVML unavailable ({type(e).__name__}: {e})"
            return False
        try:
            self.handle = nvml_handle(self.nv, torch_uuid(self.device))
            return True
        except Exception as e:
            self.note = f"NVML device not found ({type(e).__name__}: {e})"
            self.nv.nvmlShutdown()
            return False

    def _sample_once(self):
        nv = self.nv
        for metric in METRICS:
            if metric in self.unsupported:
                continue
            try:
                self.samples[metric].append(_read(nv, self.handle, metric))
            except nv.NVMLError_NotSupported:
                self.unsupported.add(metric)
            except nv.NVMLError as e:  # any other NVML error: drop the metric, say why, keep the others
                self.unsupported.add(metric)
                self.note = f"NVML {metric}: {type(e).__name__}: {e}"

    def _loop(self):
        while not self._stop.wait(self.period):
            self._sample_once()

    def __enter__(self):
        self.samples = {m: [] for m in METRICS}
        self.handle = None
        if self._open():
            self._sample_once()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self._stop.set()
            self._thread.join()
            self._sample_once()
            self.nv.nvmlShutdown()
            self.handle = None

    def summary(self) -> dict:
        if self.device.type != "cuda":
            return {"gpu_note": self.note}
        out = {"gpu_peak_allocated_mb": _allocator_peak_mb(self.device)}
        s = self.samples
        if s["mem"]:
            out["gpu_nvml_used_max_mb"] = max(s["mem"]) / 2**20
        if s["util"]:
            out["gpu_util_mean_pct"] = statistics.mean(s["util"])
        if s["power"]:
            out["gpu_power_mean_w"] = statistics.mean(s["power"])
        if any(s.values()):
            out["gpu_samples"] = max(len(v) for v in s.values())
        if self.unsupported:
            out["gpu_unsupported"] = sorted(self.unsupported)
        if self.note:
            out["gpu_note"] = self.note
        return out
