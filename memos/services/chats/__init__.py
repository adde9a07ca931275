"""Chat sessions: each turn stored as a memory, notes recalled, the model's prefix reused."""

from memos.services.chats.service import ChatService, ChatStats
from memos.services.chats.turns import ChatTurn

__all__ = ["ChatService", "ChatStats", "ChatTurn"]
