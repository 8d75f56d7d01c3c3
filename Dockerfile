# The mmrag worker image: one image, three roles (`mmrag worker --role cpu|encode|generate`)
# plus the one-shot migrations. Used by docker-compose.yml; build it alone with
#   docker build -t mmrag:0.1.0 .
# On a CPU-only host, take torch's CPU wheels (about 2 GB smaller):
#   docker build --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu -t mmrag:0.1.0 .
FROM python:3.11.13-slim-bookworm

# A build argument is an environment variable for RUN: pip reads PIP_EXTRA_INDEX_URL itself.
ARG PIP_EXTRA_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Tesseract (Debian's package ships its English model: nothing downloads at run time) for
# OCR in the decoder sandbox of encode workers (activities/media/ocr.py, docs/media.md).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tesseract-ocr tesseract-ocr-eng \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 mmrag \
    && useradd --system --uid 10001 --gid mmrag --create-home --home-dir /home/mmrag mmrag

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so a code change does not reinstall torch;
# at the versions in constraints.txt, the ones CI tests (`make test` installs with it too).
COPY pyproject.toml README.md constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project, installed (`pip install .`: the packages and the `mmrag` command) with its
# package data: the Alembic environment and versions (migrations/) and the tiny CLIP model
# for offline smoke tests (activities/clip/tiny/, MMRAG_CLIP_MODEL=mmrag-tiny); production
# uses ViT-B-32 weights, downloaded once into the model-cache volume. Nothing of tests/ is
# copied, and the workers run what pip installed (the sources in /app only build it).
COPY settings/ settings/
COPY workflows/ workflows/
COPY activities/ activities/
COPY workers/ workers/
COPY starters/ starters/
COPY stack/ stack/
COPY migrations/ migrations/
RUN pip install --no-deps . \
    && rm -rf build *.egg-info \
    && mkdir -p /var/lib/mmrag /home/mmrag/.cache/huggingface \
    && chown -R mmrag:mmrag /var/lib/mmrag /home/mmrag/.cache

ENV MMRAG_STATE_DIR=/var/lib/mmrag \
    HF_HOME=/home/mmrag/.cache/huggingface

USER mmrag

ENTRYPOINT ["mmrag"]
CMD ["worker", "--role", "all"]
