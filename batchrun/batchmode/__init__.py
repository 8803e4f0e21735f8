"""``--mode batch``: the provider's Batch API, at half price, with online mode's
output, exit codes and resume guarantees.

Modules: ``plan`` (pure: which file a row goes into), ``build`` (writes the
files), ``record`` (the parts and batches in ``OUT.batchrun/batch/``), ``api``
(files and batches over the pooled session), ``submit`` (crash-safe
creation), ``settle`` (ended batches), ``results`` (pure: result lines to
output records), ``known`` (collected answers in input order), ``job`` (the
poll loop), ``progress``, ``phase`` (entry points), ``cancel``.
"""
