"""Step-level continuous batching for diffusion (in the spirit of vLLM's engine loop).

Every iteration the engine runs three calls — `scheduler.schedule()`, one U-Net
execution for all scheduled requests, `scheduler.update_from_output()` — so requests
at different steps, with different step counts, guidance scales and schedulers share
each U-Net call, join between iterations and leave as soon as they are done.

There is no "whole request" unit of work here, only denoising steps done versus
steps needed (`Trajectory.steps_done` vs `num_steps`).
"""
