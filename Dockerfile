# One image for every StreamML process: compose entries differ only by `command`
# (`python -m services.<name>` or `streamml <subcommand>`).
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# An unprivileged system user runs the services; the code stays root-owned (read-only to it).
RUN groupadd --system streamml \
    && useradd --system --gid streamml --home-dir /home/streamml --create-home \
       --shell /usr/sbin/nologin streamml

WORKDIR /app

# Dependency wheels are all binary (manylinux) or pure Python, so no compiler is needed.
# .dockerignore keeps .git, caches, local broker files and any .env (secrets) out of the image.
COPY . /app
RUN pip install --no-cache-dir -e .

USER streamml

# No ENTRYPOINT, so a compose `command` replaces this default whole.
# No secrets here: STREAMML_SIGNING_KEY, SASL passwords etc. come from the environment at run time.
CMD ["streamml", "--help"]
