"""Tencent Cloud's error codes (``Response.Error.Code``) and how each affects the run.

Billing: doc 002 does not say which answers are billed (its ``ResourceUnavailable.*`` codes
only say an account cannot pay); we assume only successful calls are billed, so no code here is
``charged``.
"""

from __future__ import annotations

from providers.common import ErrorSpec
from schemas.results import ErrorKind

_T, _P, _F = ErrorKind.TRANSIENT, ErrorKind.PERMANENT, ErrorKind.FATAL

# Every code of doc 002's table, the SDK's aiart errorcodes.py extras, and the Cloud API 3.0
# common error codes (tencentcloud.com "Common Error Codes"). Kinds are our reading:
# transient = retry with backoff; permanent = this row cannot succeed; fatal = no row can.
ERROR_TABLE: dict[str, ErrorSpec] = {
    # doc 002, API business codes
    "AuthFailure.UnauthorizedOperation": ErrorSpec(_F, "no CAM permission for this operation"),
    # The output failed moderation and the doc says "please try again": generation is not
    # deterministic, so a bounded retry may pass. Repeated failures end as the row's error.
    "FailedOperation.GenerateImageFailed": ErrorSpec(_T, "generated image failed the review"),
    "FailedOperation.ImageDecodeFailed": ErrorSpec(_P, "image decoding failed"),
    # Tencent could not fetch our staged URL: most likely a hiccup of our staging store (or a
    # presigned URL racing its expiry); a retry re-sends a freshly staged URL.
    "FailedOperation.ImageDownloadError": ErrorSpec(_T, "image download error"),
    "FailedOperation.ImageResolutionExceed": ErrorSpec(_P, "image resolution too high"),
    "FailedOperation.ImageSizeExceed": ErrorSpec(_P, "image too large after base64 encoding"),
    "FailedOperation.InnerError": ErrorSpec(_T, "internal service error"),
    "FailedOperation.RequestEntityTooLarge": ErrorSpec(_P, "request body too large"),
    "FailedOperation.RequestTimeout": ErrorSpec(_T, "backend service timed out"),
    "FailedOperation.RpcFail": ErrorSpec(_T, "RPC failed (algorithm service malfunction)"),
    "FailedOperation.ServerError": ErrorSpec(_T, "internal service error"),
    # Unknown failure on their side: one more attempt is cheap (failed calls are not billed, we
    # assume: see above).
    "FailedOperation.Unknown": ErrorSpec(_T, "unknown error"),
    "InvalidParameter.InvalidParameter": ErrorSpec(_P, "invalid parameters"),
    "InvalidParameterValue.ImageEmpty": ErrorSpec(_P, "no image input"),
    "InvalidParameterValue.ParameterValueError": ErrorSpec(_P, "parameter or value invalid"),
    "InvalidParameterValue.StyleConflict": ErrorSpec(_P, "conflicting styles"),
    "InvalidParameterValue.TextLengthExceed": ErrorSpec(_P, "input text too long"),
    "InvalidParameterValue.UrlIllegal": ErrorSpec(_P, "URL format invalid"),
    "OperationDenied.ImageIllegalDetected": ErrorSpec(_P, "image failed the content review"),
    "OperationDenied.TextIllegalDetected": ErrorSpec(_P, "text failed the content review"),
    "RequestLimitExceeded": ErrorSpec(_T, "too frequent requests"),
    "RequestLimitExceeded.JobNumExceed": ErrorSpec(_T, "too many concurrent tasks"),
    "ResourceUnavailable.Delivering": ErrorSpec(_F, "resource is being delivered"),
    "ResourceUnavailable.InArrears": ErrorSpec(_F, "account in arrears"),
    "ResourceUnavailable.LowBalance": ErrorSpec(_F, "insufficient balance"),
    "ResourceUnavailable.NotExist": ErrorSpec(_F, "billing status unknown: service not active"),
    "ResourceUnavailable.StopUsing": ErrorSpec(_F, "service stopped for the account"),
    "ResourcesSoldOut.ChargeStatusException": ErrorSpec(_F, "billing status abnormal"),
    # aiart errorcodes.py (SDK 3.1) beyond the doc's table
    "FailedOperation.ConsoleServerError": ErrorSpec(_T, "console service error"),
    "FailedOperation.JobNotExist": ErrorSpec(_P, "job does not exist"),
    # A run option (LogoParam) the engine refuses: every row would fail the same way.
    "InvalidParameterValue.LogoParamErr": ErrorSpec(_F, "custom logo not supported"),
    # Cloud API 3.0 common codes
    "ActionOffline": ErrorSpec(_F, "API deprecated"),
    "AuthFailure.InvalidAuthorization": ErrorSpec(_F, "Authorization header invalid"),
    "AuthFailure.InvalidSecretId": ErrorSpec(_F, "invalid key type"),
    "AuthFailure.MFAFailure": ErrorSpec(_F, "MFA failed"),
    "AuthFailure.SecretIdNotFound": ErrorSpec(_F, "key does not exist or is disabled"),
    # We sign right before sending, so only a skewed local clock expires signatures.
    "AuthFailure.SignatureExpire": ErrorSpec(_F, "signature expired: check the local clock"),
    "AuthFailure.SignatureFailure": ErrorSpec(_F, "signature invalid: check the secret key"),
    "AuthFailure.TokenFailure": ErrorSpec(_F, "session token invalid"),
    "DryRunOperation": ErrorSpec(_P, "dry run"),
    "FailedOperation": ErrorSpec(_P, "operation failed"),
    "InternalError": ErrorSpec(_T, "internal error"),
    # Codes about how every request is built (action, version, region, parameters, protocol):
    # the same for each row, so stop the run instead of failing row after row.
    "InvalidAction": ErrorSpec(_F, "API does not exist"),
    "InvalidParameter": ErrorSpec(_P, "incorrect parameter"),
    "InvalidParameterValue": ErrorSpec(_P, "invalid parameter value"),
    "InvalidRequest": ErrorSpec(_F, "request body format incorrect"),
    "IpInBlacklist": ErrorSpec(_F, "caller IP in blacklist"),
    "IpNotInWhitelist": ErrorSpec(_F, "caller IP not in whitelist"),
    "LimitExceeded": ErrorSpec(_F, "quota limit exceeded"),
    "MissingParameter": ErrorSpec(_F, "a required parameter is missing"),
    "NoSuchProduct": ErrorSpec(_F, "product does not exist"),
    "NoSuchVersion": ErrorSpec(_F, "API version does not exist"),
    "RequestLimitExceeded.GlobalRegionUinLimitExceeded": ErrorSpec(_T, "account rate limit"),
    "RequestLimitExceeded.IPLimitExceeded": ErrorSpec(_T, "IP rate limit"),
    "RequestLimitExceeded.UinLimitExceeded": ErrorSpec(_T, "account rate limit"),
    "RequestSizeLimitExceeded": ErrorSpec(_P, "request too large"),
    "ResourceInUse": ErrorSpec(_T, "resource in use"),
    "ResourceInsufficient": ErrorSpec(_T, "insufficient resources"),
    "ResourceNotFound": ErrorSpec(_P, "resource does not exist"),
    "ResourceUnavailable": ErrorSpec(_F, "resource unavailable"),
    # A base64 answer too large to return (the doc warns of it): this row needs RspImgType url.
    "ResponseSizeLimitExceeded": ErrorSpec(_P, "response too large"),
    "ServiceUnavailable": ErrorSpec(_T, "service temporarily unavailable"),
    "UnauthorizedOperation": ErrorSpec(_F, "unauthorized operation"),
    "UnknownParameter": ErrorSpec(_F, "unknown parameter"),
    "UnsupportedOperation": ErrorSpec(_F, "unsupported operation"),
    "UnsupportedProtocol": ErrorSpec(_F, "unsupported HTTP(S) protocol"),
    "UnsupportedRegion": ErrorSpec(_F, "API does not support the region"),
}

# Codes not in the table are classified by their first segment; anything else is permanent.
PREFIX_KINDS: dict[str, ErrorKind] = {
    "AuthFailure": _F,
    "UnauthorizedOperation": _F,
    "ResourceUnavailable": _F,
    "ResourcesSoldOut": _F,
    "LimitExceeded": _F,
    "RequestLimitExceeded": _T,
    "InternalError": _T,
    "ServiceUnavailable": _T,
}


def classify_code(code: str) -> ErrorKind:
    """The kind of a Tencent error code: the table's, else by prefix, else permanent."""
    spec = ERROR_TABLE.get(code)
    if spec is not None:
        return spec.kind
    return PREFIX_KINDS.get(code.split(".", 1)[0], ErrorKind.PERMANENT)
