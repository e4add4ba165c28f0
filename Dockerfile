# syntax=docker/dockerfile:1
# allot: build wheels in one stage, run as an unprivileged user in a slim one.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY allocator/ allocator/
COPY lua/ lua/
COPY loadtest/ loadtest/
# Our wheel first (the lua/*.lua scripts and migrations/*.sql are package data inside it),
# then wheels for every dependency, so the runtime stage installs offline.
RUN pip wheel --no-deps -w /wheels . \
 && pip wheel -w /wheels /wheels/allot-*.whl

FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system allot \
 && useradd --system --gid allot --home-dir /app --no-create-home --shell /usr/sbin/nologin allot
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels allot \
 && cd / && python -c "import importlib.resources as r; assert (r.files('lua')/'claim.lua').is_file()"
WORKDIR /app
COPY config/ /app/config/
USER allot
ENV ALLOT_PORT=8080
# 9180: the operations listener (/metrics); it binds 127.0.0.1 unless ALLOT_OPS_HOST says
# otherwise (docker-compose.yml sets 0.0.0.0 and publishes it to the host's loopback only).
EXPOSE 8080 9180
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ALLOT_PORT', '8080'), timeout=2)"]
CMD ["allot", "serve", "--host", "0.0.0.0", "--workers", "2"]
