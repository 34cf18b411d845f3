"""Interactive chat for `lamina chat`: streaming replies, /reset, /exit, Ctrl-C and Ctrl-D."""

from __future__ import annotations

import sys
from typing import TextIO

from engine.api import LLM
from engine.sampling import SamplingParams

HELP = "Type a message. /reset clears the conversation, /exit or Ctrl-D leaves, Ctrl-C stops a reply."


class ChatSession:
    def __init__(
        self,
        llm: LLM,
        params: SamplingParams,
        system: str | None = None,
        out: TextIO = sys.stdout,
    ) -> None:
        self.llm = llm
        self.params = params
        self.system = system
        self.out = out
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def run(self) -> None:
        """Read lines until /exit or end of input; each line gets a streamed reply."""
        interactive = sys.stdin.isatty()
        if interactive:
            _enable_line_editing()
            print(HELP, file=self.out)
        while True:
            try:
                line = input(">>> " if interactive else "")
            except EOFError:
                print(file=self.out)
                return
            except KeyboardInterrupt:
                print(file=self.out)
                continue
            command = line.strip()
            if command == "/exit":
                return
            if command == "/reset":
                self.reset()
                print("(conversation cleared)", file=self.out)
                continue
            if command:
                self.reply(line)

    def reply(self, user_text: str) -> str:
        """Stream the model's answer to `user_text`; Ctrl-C keeps what was said so far."""
        self.messages.append({"role": "user", "content": user_text})
        stream = self.llm.stream_chat(self.messages, self.params)
        try:
            for piece in stream:
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            stream.close()
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.messages.append({"role": "assistant", "content": stream.output.text})
        return stream.output.text


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401  (importing it gives input() history and editing)
    except ImportError:
        pass
