"""Placeholder: this dialect's routes are being built (issue 5)."""

from fastapi import APIRouter

router = APIRouter()
