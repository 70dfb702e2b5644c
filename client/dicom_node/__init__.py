"""The site's DICOM storage node (``mammofed-client serve``): see ``node``."""

from client.dicom_node.node import DicomNode

__all__ = ["DicomNode"]
