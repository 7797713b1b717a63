"""Evaluation over lmms-eval: the ``dymu`` model (:mod:`.model`), method settings (:mod:`.settings`), per-sample
costs (:mod:`.costs`), the ``dymu eval`` runner (:mod:`.runner`) and the table (:mod:`.report`).

Importing this package imports nothing heavy; :mod:`.model` and :mod:`.runner` need the ``eval`` extra (lmms-eval).
"""
