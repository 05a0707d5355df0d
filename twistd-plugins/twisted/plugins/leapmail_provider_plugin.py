# twistd discovers services through modules in twisted/plugins/; this one names the
# provider's (see leapmail/provider/service.py).
from twisted.application.service import ServiceMaker

leapmail_provider = ServiceMaker(
    "leapmail-provider",
    "leapmail.provider.service",
    "leapmail provider: the sync endpoint devices replicate their encrypted mail through",
    "leapmail-provider",
)
