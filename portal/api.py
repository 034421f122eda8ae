"""API plumbing shared by every app: errors a user can cause become clear JSON answers, never a 500."""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc, context):
    status_code = getattr(exc, "status", None)
    as_dict = getattr(exc, "as_dict", None)
    if isinstance(status_code, int) and callable(as_dict):
        # Domain errors (clusters.errors.ClusterError, network.errors.NetworkError) carry their status.
        return Response(as_dict(), status=status_code)
    if isinstance(exc, DjangoValidationError):
        data = exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}
        return Response(data, status=status.HTTP_400_BAD_REQUEST)
    return drf_exception_handler(exc, context)
