"""The queue side: RQ workers that keep a MelFusion pipeline loaded and run jobs in-process."""
