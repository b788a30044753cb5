"""gunicorn settings for every way the hub is served (Dockerfile, docker-compose, benchmarks):
gunicorn reads ./gunicorn.conf.py from its working directory; command-line flags add to it."""

# Import the app, and with it the query encoder (hub/wsgi.py), once in the master before forking:
# workers share those pages copy-on-write, so N workers hold one copy of the encoder's weights
# instead of N (less memory, and one copy in the CPU's shared cache whichever worker answers),
# and a worker's first search does not wait for the model to load.
preload_app = True
