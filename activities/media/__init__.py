"""Media: what a file is, and decoding it inside the decoder sandbox.

- :mod:`.formats`: the supported types, sniffed from the bytes (a mismatch with the name or
  declared content type is only noted); the cheap check on the ``mmrag`` queue
  (:func:`~activities.media.formats.check_object`: first bytes and size only); the bounds a
  hostile file runs into; the decoded output (steps and chunks).
- :mod:`.images`, :mod:`.pdf`, :mod:`.video`: one decoder per family.
- :mod:`.decode`: the decoder entry point, ``iter_steps``: a file of a sniffed type turned
  into steps (one image, one PDF page and its text, one video keyframe), each with a JSON
  cursor from which decoding resumes; only ``BadMediaError`` comes out of it.
- :mod:`.sandbox`: in the worker every file (images, Ask's query images, PDFs and videos)
  is decoded by ``iter_steps`` in a sandboxed child process with hard time, CPU, memory
  and file limits, no secrets and, where the kernel allows, no network.

Every failure is a ``BadMediaError`` whose message says what is wrong with the file and
what to do, so the asset fails alone, non-retryably, and the user can fix or remove it.
The imports point one way: formats <- images <- pdf, video <- decode <- sandbox.
"""
