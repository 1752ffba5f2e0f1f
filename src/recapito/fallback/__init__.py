"""Fallback channels: policy, sweeper, SMS (Twilio), paper letters and data-cleaning exports."""
