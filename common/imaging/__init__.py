"""Images: reading DICOM and research images, model space, cache, datasets.

DICOM and PNG/TIFF reading, preprocessing to model space, the site cache,
annotations and training datasets.
"""
