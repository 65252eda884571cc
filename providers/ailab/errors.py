"""AILabTools' public error codes and how each affects the run (shared by both clients).

Billing: the vendor bills successful calls only, per its billing notes on each API's page
("Each successful API request consumes N credits [...]. Failed requests are not billed.",
www.ailabtools.com/docs, 2026-06-25; see ``settings.PRICE``): no code here is ``charged``.
"""

from __future__ import annotations

from providers.common import ErrorSpec
from schemas.results import ErrorKind

CREDITS_CODE = "ERROR_NOT_ENOUGH_CREDITS"

_P, _T, _F = ErrorKind.PERMANENT, ErrorKind.TRANSIENT, ErrorKind.FATAL

# Every code of the public table (doc/response-description), keyed by ``error_detail.code``
# (the same names appear as ``error_code_str``). Kinds are our reading: account and key
# problems stop the run; "please try again later", resource and transfer failures are
# transient; parameter, file and content problems fail the row.
ERROR_TABLE: dict[str, ErrorSpec] = {
    code: ErrorSpec(kind, meaning, http_status=status)
    for code, status, kind, meaning in (
        # -- 400
        # The SDK lists it under 500: a processing failure may pass on a retry.
        ("PROCESSING_FAILURE", 400, _T, "processing failed"),
        ("ERROR_PARAMETERS", 400, _P, "invalid parameters"),
        ("MISSING_PARAMETERS", 400, _P, "missing parameters"),
        ("ERROR_INVALID_PARAMETER", 400, _P, "invalid parameter"),
        ("PARAMETERS_CANNOT_EMPTY", 400, _P, "parameters cannot be empty"),
        ("ERROR_MISSING_LIMIT_PARAMETER", 400, _P, "missing Limit parameter"),
        ("ERROR_MISSING_TASKS_PARAMETER", 400, _P, "missing Tasks parameter"),
        ("ERROR_MISSING_ASSURE_DIRECTION_PARAMETER", 400, _P, "missing AssureDirection"),
        ("ERROR_MISSING_MIN_HEIGHT_PARAMETER", 400, _P, "missing MinHeight parameter"),
        ("ERROR_INVALID_SIDE_PARAMETER", 400, _P, "invalid value for Side"),
        ("ERROR_TOO_MANY_FILES", 400, _P, "number of files exceeds the limit"),
        ("ERROR_FACE_TRACE_LIMIT_EXCEEDED", 400, _P, "face or trace limit exceeded"),
        ("ERROR_INVALID_URL", 400, _P, "invalid URL"),
        ("ERROR_DATABASE_LIMIT_EXCEEDED", 400, _P, "database limit exceeded"),
        ("ERROR_INVALID_RESPONSE_FORMAT", 400, _P, "Accept not supported"),
        ("ERROR_UNSUPPORTED_RESPONSE_FORMAT", 400, _P, "format not supported"),
        ("ERROR_TOO_MANY_GROUPS_IN_GROUP_LIST", 400, _P, "too many groups in group_list"),
        ("ERROR_TOO_MANY_UIDS_IN_UID_LIST", 400, _P, "too many UIDs in uid_list"),
        ("ERROR_TOO_MANY_APPS_IN_APP_LIST", 400, _P, "too many apps in app_list"),
        ("ERROR_BATCH_TASK_LIMIT_EXCEEDED", 400, _T, "batch task processing limit exceeded"),
        ("ERROR_CLEANING_USER_GROUP_DATA", 400, _T, "cleaning user group data"),
        ("ERROR_IMAGE_STORAGE_NOT_SUPPORTED", 400, _P, "image storage not supported"),
        ("ERROR_INSUFFICIENT_RESOURCES", 400, _T, "insufficient resources"),
        ("ERROR_RESOURCE_IN_TRANSIT", 400, _T, "resource in transit"),
        ("ERROR_FILE_DOWNLOAD_FAILED", 400, _T, "file download failed"),
        ("ERROR_FILE_UPLOAD_FAILED", 400, _T, "file upload failed"),
        ("FILE_DECODING_FAILURE", 400, _P, "file decoding failed"),
        # The SDK lists these three under 502: their service failed, not the input.
        ("ERROR_FACE_BLENDING_FAILED", 400, _T, "face blending failed"),
        ("ERROR_FACE_IMAGE_ADDITION_FAILED", 400, _T, "failed to add face image"),
        ("ERROR_GET_FACE_IMAGE_FAILED", 400, _T, "failed to get face image"),
        ("ERROR_DATA_TRANSFER_FAILED", 400, _T, "data transfer failed"),
        ("ERROR_TASK_REVOCATION_FAILED", 400, _P, "task revocation failed"),
        ("ERROR_RESOURCE_UNAVAILABLE", 400, _T, "resource temporarily unavailable"),
        ("ERROR_FILE_DOWNLOAD_TIMEOUT", 400, _T, "file download timeout"),
        # -- 401 / 403: the key or the account; no row can succeed
        ("ERROR_USER_NOT_EXISTS", 401, _F, "the user does not exist"),
        ("ERROR_APPLICATIONS_NOT_EXISTS", 401, _F, "the application (API key) does not exist"),
        ("ERROR_USER_LOCKED", 403, _F, "the user is locked"),
        ("AI_SERVICE_UNAUTHORIZED", 403, _F, "AI service unauthorized"),
        # A 403 that is about one file, not the account: classify by code, never by status.
        ("ERROR_ILLEGAL_FILE", 403, _P, "illegal file"),
        # -- 404
        ("ERROR_AI_NOT_EXISTS", 404, _F, "AI does not exist or has been deactivated"),
        ("AI_SERVICE_NOT_FOUND", 404, _T, "AI service not found, try again later"),
        ("ERROR_FILE_NOT_FOUND", 404, _P, "file not found"),
        ("ERROR_FACE_NOT_FOUND", 404, _P, "face not found"),
        ("ERROR_USER_GROUP_NOT_FOUND", 404, _P, "user group not found"),
        ("ERROR_USER_NOT_FOUND", 404, _P, "user not found"),
        ("ERROR_FACE_TOKEN_NOT_FOUND", 404, _P, "face token not found"),
        ("ERROR_CONTENT_NOT_FOUND", 404, _P, "content not found"),
        ("ERROR_RESOURCE_NOT_FOUND", 404, _P, "resource not found"),
        # -- 405 / 409 / 410
        ("ERROR_ILLEGAL_OPERATION", 405, _P, "illegal operation"),
        ("ERROR_FACE_ALREADY_EXISTS", 409, _P, "face already exists"),
        ("ERROR_DATA_ALREADY_EXISTS", 409, _P, "data already exists"),
        ("ERROR_USER_GROUP_ALREADY_EXISTS", 409, _P, "user group already exists"),
        ("ERROR_USER_ALREADY_EXISTS", 409, _P, "user already exists"),
        ("ERROR_DUPLICATE_GROUP_NAME", 409, _P, "duplicate group name"),
        ("ERROR_RESOURCE_IN_USE", 409, _P, "resource is in use"),
        ("ERROR_TASK_CONFLICT", 409, _P, "task conflict"),
        ("ERROR_TASK_REVOKED", 409, _P, "task has already been revoked"),
        ("ERROR_RESOURCE_RECLAIMED", 410, _P, "resource has been reclaimed"),
        # -- 413 / 415: the input is too big or of the wrong type
        ("FILE_SIZE_EXCEEDS_LIMIT", 413, _P, "file size exceeds limit"),
        ("ERROR_CONTENT_TOO_LONG", 413, _P, "content length exceeds limit"),
        ("ERROR_VIDEO_DURATION_EXCEEDED", 413, _P, "video duration exceeds limit"),
        ("ERROR_REQUEST_BODY_TOO_LARGE", 413, _P, "request body size exceeds limit"),
        ("ERROR_RESPONSE_BODY_TOO_LARGE", 413, _P, "response body size exceeds limit"),
        ("UNSUPPORTED_FILE_TYPES", 415, _P, "unsupported file types"),
        ("ERROR_INVALID_OUTPUT_FORMAT", 415, _P, "invalid output format"),
        ("ERROR_UNSUPPORTED_GRAYSCALE_IMAGE", 415, _P, "grayscale image not supported"),
        # -- 422: values, files and content the service will not process
        ("UNSUPPORTED_PARAMETER_VALUES", 422, _P, "invalid parameter values"),
        ("ERROR_INVALID_FACE_BOX_PARAMETER", 422, _P, "face box parameter invalid"),
        ("ERROR_INVALID_BIG_EYES_PARAMETER", 422, _P, "big eyes parameter invalid"),
        ("ERROR_INVALID_FACE_SLIMMING_PARAMETER", 422, _P, "face slimming parameter invalid"),
        ("ERROR_INVALID_SMOOTHING_PARAMETER", 422, _P, "smoothing parameter invalid"),
        ("ERROR_INVALID_SKIN_WHITENING_PARAMETER", 422, _P, "skin whitening parameter invalid"),
        ("ERROR_INVALID_PARAMETER_FORMAT", 422, _P, "invalid parameter format"),
        ("ERROR_PARAMETER_CONVERSION_FAILED", 422, _P, "parameter conversion failed"),
        ("FILE_RESOLUTION_EXCEEDS_LIMITS", 422, _P, "file resolution exceeds limits"),
        ("ERROR_LOW_RESOLUTION", 422, _P, "file resolution too low"),
        ("ERROR_HIGH_RESOLUTION", 422, _P, "file resolution too high"),
        ("ERROR_INVALID_FILE", 422, _P, "invalid file"),
        ("FILE_CONTENT_NON_COMPLIANCE", 422, _P, "file content does not meet requirements"),
        ("ERROR_INCORRECT_FILE_COUNT", 422, _P, "incorrect number of files"),
        ("ERROR_NO_FACE_IN_FILE", 422, _P, "no face detected in the file"),
        ("ERROR_FACE_SIZE_NOT_MEET_REQUIREMENTS", 422, _P, "face size not as required"),
        ("ERROR_FACE_SIZE_RATIO_NOT_MET", 422, _P, "face size ratio not as required"),
        ("ERROR_SMALL_FACE_SIZE", 422, _P, "face size too small"),
        ("ERROR_FACE_COPY_SCENE_MISMATCH", 422, _P, "face copy scene type mismatch"),
        ("ERROR_FACE_UNRECOGNIZABLE", 422, _P, "unable to recognize face"),
        ("ERROR_POOR_FACE_QUALITY", 422, _P, "poor face quality"),
        ("ERROR_BLURRY_FACE", 422, _P, "blurry face"),
        ("ERROR_OBSTRUCTED_FACE", 422, _P, "obstructed face"),
        ("ERROR_POOR_FACE_LIGHTING", 422, _P, "poor face lighting"),
        ("ERROR_INCOMPLETE_FACE", 422, _P, "incomplete face"),
        ("ERROR_FACE_NOT_FACING_FORWARD", 422, _P, "face not facing forward"),
        ("ERROR_MISSING_OUTPUT_FORMAT", 422, _P, "missing output format"),
        ("ERROR_QUALITY_SCORE_NOT_MEET_REQUIREMENTS", 422, _P, "quality score too low"),
        ("ERROR_QUALITY_CONTROL_ERROR", 422, _P, "quality control error"),
        ("ERROR_LIVENESS_CONTROL_ERROR", 422, _P, "liveness control error"),
        ("ERROR_SCENE_TYPE_MISMATCH", 422, _P, "scene type mismatch"),
        ("ERROR_CARTOON_FACE_NOT_SUPPORTED", 422, _P, "cartoon face not supported"),
        ("ERROR_TEMPLATE_IMAGE_QUALITY_TOO_LOW", 422, _P, "template image quality too low"),
        ("ERROR_ACTION_VERIFICATION_FAILED", 422, _P, "action verification failed"),
        ("ERROR_LEFT_EYE_OCCLUSION_TOO_HIGH", 422, _P, "left eye occlusion too high"),
        ("ERROR_RIGHT_EYE_OCCLUSION_TOO_HIGH", 422, _P, "right eye occlusion too high"),
        ("ERROR_LEFT_FACE_OCCLUSION_TOO_HIGH", 422, _P, "left face occlusion too high"),
        ("ERROR_RIGHT_FACE_OCCLUSION_TOO_HIGH", 422, _P, "right face occlusion too high"),
        ("ERROR_CHIN_OCCLUSION_TOO_HIGH", 422, _P, "chin occlusion too high"),
        ("ERROR_NOSE_OCCLUSION_TOO_HIGH", 422, _P, "nose occlusion too high"),
        ("ERROR_MOUTH_OCCLUSION_TOO_HIGH", 422, _P, "mouth occlusion too high"),
        ("ERROR_SYNTHESIS_DETECTION_FAILED", 422, _P, "synthesis detection failed"),
        ("ERROR_LIVENESS_DETECTION_FAILED", 422, _P, "liveness detection failed"),
        ("ERROR_NO_RECOGNITION_TARGET_DETECTED", 422, _P, "no recognition target detected"),
        ("ERROR_IMAGE_RECOGNITION_FAILED", 422, _P, "image recognition error"),
        ("ERROR_MASK_IMAGE_RESOLUTION_MISMATCH", 422, _P, "mask and image sizes differ"),
        ("ERROR_TASK_STOPPED_PROCESSING", 422, _P, "task has been stopped processing"),
        # The SDK lists it under 429: a usage limit, so worth waiting for.
        ("EXCEEDING_LIMITS", 422, _T, "exceeds limit"),
        ("ERROR_CONTENT_NON_COMPLIANCE", 422, _P, "content does not meet requirements"),
        # -- 429: out of credits (every other 429 is rate limiting, see classify)
        (CREDITS_CODE, 429, _F, "insufficient credits"),
        # -- 5xx: theirs, and all say "please try again later"
        ("UNKNOWN_ERROR", 500, _T, "unknown error"),
        ("SERVICE_INTERNAL_ERROR", 500, _T, "service internal error"),
        ("FILE_SERVICE_ERROR", 500, _T, "file service error"),
        ("AI_SERVICE_ERROR", 500, _T, "AI service error"),
        ("AI_SERVICE_INTERNAL_ERROR", 500, _T, "AI service internal error"),
        ("ERROR_GATEWAY", 502, _T, "gateway error"),
        ("AI_SERVICE_FLOW_RESTRICTION", 503, _T, "AI service is rate-limited"),
        ("AI_SERVICE_TIMEOUT", 504, _T, "AI service timeout"),
    )
}


def classify(status: int, code: str, legacy_code: str) -> tuple[ErrorKind, str]:
    """(kind, our code) for an error answer: the vendor's code first, the HTTP status last."""
    # The doc's subtlety: HTTP 429 is "out of credits" only when the code says so.
    if CREDITS_CODE in (code, legacy_code):
        return ErrorKind.FATAL, CREDITS_CODE
    spec = ERROR_TABLE.get(code) or ERROR_TABLE.get(legacy_code)
    if spec is not None:
        return spec.kind, code if code in ERROR_TABLE else legacy_code
    if status == 429:
        return ErrorKind.TRANSIENT, "RATE_LIMITED"
    name = code or f"HTTP_{status}"
    if status >= 500:
        return ErrorKind.TRANSIENT, name
    if status in (401, 403):
        return ErrorKind.FATAL, name
    return ErrorKind.PERMANENT, name if status >= 400 or code else "UNKNOWN_CODE"
