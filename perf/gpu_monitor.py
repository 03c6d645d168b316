"""Per-rank GPU telemetry for the benchmarks: NVML memory, utilisation and power sampled in a thread, and torch's
peak allocated memory. Without a GPU (or without NVML) it reports nothing and the benchmark carries on."""
import statistics
import threading

import torch


class GpuMonitor:
    """`with GpuMonitor(device): ...` samples NVML every `period` seconds; summary() gives gpu_* fields."""

    def __init__(self, device: torch.device, period: float = 0.05):
        self.device, self.period = device, period
        self.handle, self.samples, self.note = None, [], None
        if device.type != "cuda":
            self.note = "no GPU"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as e:  # NVML missing or not permitted: keep the torch memory numbers only
            self.note = f"NVML unavailable ({type(e).__name__}: {e})"

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _sample(self):
        nv = self.nvml
        while not self._stop.wait(self.period):
            mem = nv.nvmlDeviceGetMemoryInfo(self.handle).used
            util = nv.nvmlDeviceGetUtilizationRates(self.handle).gpu
            power = nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
            self.samples.append((mem, util, power))

    def __enter__(self):
        self.samples = []
        if self.handle is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if self.device.type != "cuda":
            return {"gpu_note": self.note}
        out = {"gpu_peak_allocated_mb": torch.cuda.max_memory_allocated(self.device) / 2**20}
        if self.samples:
            mem, util, power = zip(*self.samples)
            out.update(gpu_nvml_used_max_mb=max(mem) / 2**20, gpu_util_mean_pct=statistics.mean(util),
                       gpu_power_mean_w=statistics.mean(power), gpu_samples=len(self.samples))
        elif self.note:
            out["gpu_note"] = self.note
        return out
