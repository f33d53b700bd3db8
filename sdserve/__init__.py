"""sdserve: Stable Diffusion / SDXL serving on Ray. Packages: core (engine), serving (Ray Serve), batch_jobs (Ray Data)."""
__version__ = "0.1.0"
