"""The named agents `llmos run --agent NAME` knows (their tools are the kernel's built-in ones)."""

from __future__ import annotations

from llmos.agents.agent import AgentSpec

CODER = AgentSpec(
    name="coder",
    instructions=(
        "You solve tasks by writing and running Python code. Always compute with code; never guess."
    ),
    tools=["python"],
    style="code",
    max_steps=6,
    max_tokens_per_step=384,
)

ASSISTANT = AgentSpec(
    name="assistant",
    instructions=(
        "You are a careful assistant working in a private workspace. Use the tools to read and "
        "write files and to compute; then call final_answer."
    ),
    tools=["python", "read_file", "write_file", "list_files"],
)

RESEARCHER = AgentSpec(
    name="researcher",
    instructions=(
        "You answer questions from the documents stored in long-term memory. First call recall with "
        "the key words of the question. Then call final_answer with a short answer and the sources "
        "recall named. Use only what recall returned."
    ),
    tools=["recall"],
    cite_sources=True,
    max_steps=5,
)

AGENTS: dict[str, AgentSpec] = {agent.name: agent for agent in (CODER, ASSISTANT, RESEARCHER)}


def agent_spec(name: str) -> AgentSpec:
    if name not in AGENTS:
        raise KeyError(f"No agent named {name!r}; the agents are: {', '.join(AGENTS)}.")
    return AGENTS[name]
