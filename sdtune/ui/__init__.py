"""`sdtune ui`: a local web app over the library: prepare a dataset, launch and watch runs,
look at the results and generate with them.

The server (FastAPI on uvicorn) only calls sdtune's own functions and starts `sdtune` commands
as jobs (sdtune.runs); the page is plain HTML, CSS and JavaScript shipped in `static/`, so no
build step is needed. Every path a request names is resolved inside the workspace.
"""
