"""What the session worker hands its handlers as ctx.app."""

from dataclasses import dataclass

from services.session.activity import ActivityFeed
from services.session.members import MemberDirectory


@dataclass(frozen=True)
class App:
    feed: ActivityFeed  # the chat lists' activity (activity.touch)
    directory: MemberDirectory  # members and their devices (a key batch seals to every device)
