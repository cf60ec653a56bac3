"""SCSI numbers shared by the whole layer: status codes, sense keys, ASC/ASCQ pairs, opcodes.

Names follow SAM-5 / SPC-4 / SBC-3 (and Linux's scsi_proto.h where it has one), so a reader
can grep the standards for them.
"""

from __future__ import annotations

# -- status (SAM-5 5.3) -------------------------------------------------------------------
GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
ACA_ACTIVE = 0x30
TASK_ABORTED = 0x40

# -- sense keys (SPC-4 4.5.6) ---------------------------------------------------------------
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# -- additional sense code / qualifier pairs (SPC-4 D.2) ------------------------------------
ASC_NO_ADDITIONAL_SENSE = (0x00, 0x00)
ASC_LOGICAL_UNIT_COMMUNICATION_FAILURE = (0x08, 0x00)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_UNRECOVERED_READ_ERROR = (0x11, 0x00)
ASC_PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
ASC_INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
ASC_INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)
ASC_SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
ASC_MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
ASC_INTERNAL_TARGET_FAILURE = (0x44, 0x00)

# -- operation codes ---------------------------------------------------------------------
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
VERIFY_10 = 0x2F
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SELECT_10 = 0x55
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
VERIFY_16 = 0x8F
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3
READ_12 = 0xA8
WRITE_12 = 0xAA

# service actions
SAI_READ_CAPACITY_16 = 0x10
MI_REPORT_SUPPORTED_OPERATION_CODES = 0x0C

# -- peripheral device type / qualifier (SPC-4 6.6.2) ---------------------------------------
TYPE_DISK = 0x00
# qualifier 3, type 0x1F: "the device server is not capable of supporting a peripheral
# device on this logical unit" -- what INQUIRY to a LUN that does not exist returns.
PQ_NOT_CAPABLE = 0x7F
