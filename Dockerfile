# relayproxy in a container. Build: docker build -t relayproxy .
# Run:   docker run -v /etc/relayproxy:/etc/relayproxy:ro -p 587:587 -p 465:465 relayproxy
# The config, users file, TLS certificate and upstream secrets come from the mounted /etc/relayproxy;
# refresh tokens that providers rotate, and the spool (delivery = "spool" or "relay-then-spool",
# /var/lib/relayproxy/spool by default), need a writable volume: -v relayproxy-state:/var/lib/relayproxy
FROM python:3.11-slim

RUN useradd --system --no-create-home --home-dir /var/lib/relayproxy relayproxy \
    && mkdir -p /var/lib/relayproxy && chown relayproxy: /var/lib/relayproxy

WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY relayproxy ./relayproxy
COPY twisted ./twisted
# A regular install: twistd does not see the plugin of a PEP 660 editable one.
RUN pip install --no-cache-dir . && rm -rf /src

USER relayproxy
WORKDIR /var/lib/relayproxy
EXPOSE 587 465
# SIGTERM drains sessions for [server] shutdown_grace seconds; give docker stop more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "relayproxy"]
CMD ["--config", "/etc/relayproxy/relayproxy.toml"]
