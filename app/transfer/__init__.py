"""Moving things between RECO installs: memory versions out and in (clip-retrieval's layout plus a manifest).

A room of its own: it uses the library (store, memory, build), which never imports it.
"""
