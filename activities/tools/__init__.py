"""Tool calls of an llm step's loop as activities: command tools and MCP servers."""

from llmmixer.activities.tools.command_tool import CommandToolActivities
from llmmixer.activities.tools.mcp_sessions import (
    ALLOWED_MCP_URLS_VARIABLE,
    McpSessionPool,
    parse_allowed_mcp_urls,
)
from llmmixer.activities.tools.mcp_tools import McpToolActivities

__all__ = [
    "ALLOWED_MCP_URLS_VARIABLE",
    "CommandToolActivities",
    "McpSessionPool",
    "McpToolActivities",
    "parse_allowed_mcp_urls",
]
