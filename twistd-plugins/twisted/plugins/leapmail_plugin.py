# twistd discovers services through modules in twisted/plugins/; this one names ours.
from twisted.application.service import ServiceMaker

leapmail = ServiceMaker(
    "leapmail",
    "leapmail.service",
    "leapmail: local IMAP/SMTP over an end-to-end encrypted store",
    "leapmail",
)
