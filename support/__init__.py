"""What serves the method and may be skipped on a first reading: files in and out (rasters, clicks,
maps on disk, data set layouts), bands and their scale, run folders, speed, one-line errors, and the
click page's server side. Nothing here imports the lesson files; they call each piece in one line.
"""

IGNORE = 255  # the label of a pixel that carries no class: data.py's "no label", no data in a mask
