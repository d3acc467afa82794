"""farm: a distributed render farm for Stable Diffusion XL. This package is the shared vocabulary (no torch)."""
