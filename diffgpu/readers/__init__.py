"""diffgpu's own readers for detector formats where RosettaSciIO's lazy reading does not suit
frame-wise work (frames split across chunks, whole files mapped, slow decoding).

Each reader returns a lazy dask array of whole frames plus axes and metadata; :func:`diffgpu.load`
picks the reader by file extension and falls back to RosettaSciIO for every other format.
"""
