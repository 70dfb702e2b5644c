"""What the storage node accepts, and the DICOM status it answers otherwise.

:func:`check_received` looks at the header of one C-STORE request (no pixel
decoding; that happens when the exam is scored). A refusal carries the
C-STORE-RSP status, the offending attribute and its value:

==========  =====================================  ==================================
status      meaning (PS3.4 B.2.3, PS3.7 C)         when
==========  =====================================  ==================================
``0x0122``  Refused: SOP Class not supported        the SOP class is not a Digital
                                                    Mammography X-Ray Image class
                                                    (CT, MR, SR, ...): the node
                                                    stores mammograms only
``0xA900``  Error: Data Set does not match SOP      a mammography SOP class whose
            Class                                   data set is not one: Modality not
                                                    ``MG``, no Pixel Data, SOP class
                                                    in the data set differing from
                                                    the request's, or a UID that is
                                                    not a valid UID
``0xC210``  Error: Cannot understand                the data set cannot be decoded
==========  =====================================  ==================================
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from common.errors import shown
from common.imaging.dicom import MAMMO_SOP_CLASSES, header_text, is_valid_uid

#: Refused: SOP Class not supported (PS3.7 C.5.x, valid in a C-STORE-RSP).
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: Error: Data Set does not match SOP Class (PS3.4 B.2.3, A9xx).
STATUS_DATASET_MISMATCH = 0xA900
#: Error: Cannot understand (PS3.4 B.2.3, Cxxx).
STATUS_CANNOT_UNDERSTAND = 0xC210
#: Refused: Out of resources (PS3.4 B.2.3, A7xx): the node could not store it.
STATUS_OUT_OF_RESOURCES = 0xA700
#: Success.
STATUS_SUCCESS = 0x0000


@dataclass(frozen=True)
class Refusal:
    """Why an incoming instance is refused.

    Attributes:
        status: the C-STORE-RSP status sent back.
        field: the DICOM attribute keyword at fault.
        value: its value as received (``"absent"`` when missing).
        reason: one line for the log.
    """

    status: int
    field: str
    value: str
    reason: str

    def message(self, sop_instance_uid: str) -> str:
        """Log line naming the instance, the field, the value and the status.

        Values from the sender are quoted bounded (:func:`common.errors.shown`):
        a header element may be megabytes long.
        """
        uid = sop_instance_uid
        if uid != "absent" and not is_valid_uid(uid):
            uid = shown(uid)
        return (
            f"refused SOP Instance {uid}: {self.field}={shown(self.value)}: "
            f"{self.reason} (status 0x{self.status:04X})"
        )


def check_received(ds: Dataset, request_sop_class: str | None = None) -> Refusal | None:
    """``None`` when ``ds`` is a mammogram the node takes; else the refusal.

    Args:
        ds: the received data set (header needed; pixels are not decoded).
        request_sop_class: Affected SOP Class UID of the C-STORE request.
    """
    sop = header_text(ds, "SOPClassUID")
    if sop not in MAMMO_SOP_CLASSES:
        if not sop:
            name = "absent"
        elif is_valid_uid(sop):
            name = UID(sop).name
        else:
            name = "not a valid UID"
        return Refusal(
            STATUS_SOP_CLASS_NOT_SUPPORTED,
            "SOPClassUID",
            sop or "absent",
            f"not a Digital Mammography X-Ray Image storage class ({name}); "
            "this node stores mammograms only",
        )
    if request_sop_class is not None and str(request_sop_class).strip() != sop:
        return Refusal(
            STATUS_DATASET_MISMATCH,
            "SOPClassUID",
            sop,
            f"differs from the request's Affected SOP Class "
            f"{shown(str(request_sop_class))}",
        )
    modality = header_text(ds, "Modality")
    if modality != "MG":
        return Refusal(
            STATUS_DATASET_MISMATCH,
            "Modality",
            modality or "absent",
            "a Digital Mammography image must have Modality MG",
        )
    if "PixelData" not in ds:
        return Refusal(
            STATUS_DATASET_MISMATCH, "PixelData", "absent", "not an image (no pixels)"
        )
    for keyword in ("SOPInstanceUID", "StudyInstanceUID"):
        uid = header_text(ds, keyword)
        if not is_valid_uid(uid):
            return Refusal(
                STATUS_DATASET_MISMATCH,
                keyword,
                uid or "absent",
                "not a valid UID (digits and dots, at most 64 characters)",
            )
    return None
