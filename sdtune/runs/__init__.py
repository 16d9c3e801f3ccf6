"""Jobs of a workspace: training and generation started as their own processes.

A workspace is one folder. Each job has a folder in it (a training run's folder is its
`output.dir`) holding `job.json`: what to run, and what became of it. A runner process
(`python -m sdtune.runs.runner`) takes the queued jobs of a device one at a time and records
their exit. Since the state lives in the folders and the runner is detached from whoever
started it, a job goes on when the web app stops, and a restarted app finds it.
"""
