using System.CommandLine;
using System.Diagnostics;
using AnyPrecML.AI;
using Microsoft.Extensions.AI;

namespace AnyPrecML.Cli;

/// <summary>
/// `anyprec bench chat`: a conversation that grows turn by turn (a long system message, then a question and the reply
/// per turn) through the chat client, with the prompt cache and without, side by side: time to the first token and to the
/// last, and the prompt tokens reused. Without the cache every turn prefills the whole history; with it, its new tokens.
/// </summary>
internal static class BenchChatCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        model.Description = "An any-precision model directory.";
        var bits = CommonOptions.Bits();
        bits.Description = "Width of the conversation (default: the seed width).";
        var turns = new Option<int>("--turns") { Description = "Turns of the conversation.", DefaultValueFactory = _ => 4 };
        var system = new Option<int>("--system-repeats") { Description = "Sentences in the system message (its length: about 35 tokens each).", DefaultValueFactory = _ => 12 };
        var maxTokens = new Option<int>("--max-tokens") { Description = "Tokens per reply.", DefaultValueFactory = _ => 16 };
        var json = CommonOptions.Json();
        var command = new Command("chat", "Time to first token per turn of a growing conversation, with the prompt cache and without.")
        {
            model, bits, turns, system, maxTokens, json,
        };
        command.SetAction(async (r, ct) =>
        {
            if (r.GetValue(turns) < 1) throw new ArgumentException("--turns must be 1 or more.");
            if (r.GetValue(system) < 0) throw new ArgumentException("--system-repeats must be 0 or more.");
            if (r.GetValue(maxTokens) < 1) throw new ArgumentException("--max-tokens must be 1 or more.");
            string directory = r.GetValue(model)!;
            var rows = new List<Row>();
            var progress = new ConsoleProgress<int>(r.Err(), "bench chat", done => (done, 2 * r.GetValue(turns)), "turns");
            // Both clients open at once and their turns alternate, so neither runs on a cooler or warmer machine than the other.
            using var plain = new AnyPrecisionChatClient(directory, new AnyPrecisionChatClientOptions { PromptCacheEntries = 0 });
            using var cached = new AnyPrecisionChatClient(directory, new AnyPrecisionChatClientOptions { PromptCacheEntries = 4 });
            int width = plain.Engine.Model.CheckBits(r.GetValue(bits) ?? plain.Engine.SeedBits);
            string kernels = plain.Engine.Kernels;
            var options = new ChatOptions { ModelId = AnyPrecisionChatClient.ModelId(plain.Metadata.ModelName, width), MaxOutputTokens = r.GetValue(maxTokens), Temperature = 0 };
            foreach (var client in new[] { plain, cached }) await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Hello")], options, ct); // warm-up: JIT, tables
            cached.PromptCacheOf(width)!.Clear(); // the warm-up's cache would be reused by the first turn (a chat template's tokens)
            var histories = new[] { plain, cached }.ToDictionary(c => c, _ => new List<ChatMessage> { new(ChatRole.System, string.Join(" ", Enumerable.Repeat(
                "You are a helpful assistant who answers questions about the old lighthouse by the harbour, its keepers and the ships that passed it.", r.GetValue(system)))) });
            for (int turn = 0; turn < r.GetValue(turns); turn++)
                foreach (var client in new[] { plain, cached })
                {
                    var history = histories[client];
                    history.Add(new ChatMessage(ChatRole.User, $"Question {turn + 1}: what happened at the lighthouse in {1850 + 7 * turn}?"));
                    long reused = client.PromptCacheOf(width)?.ReusedTokens ?? 0;
                    var sw = Stopwatch.StartNew();
                    double first = double.NaN;
                    var reply = new System.Text.StringBuilder();
                    int? promptTokens = null;
                    await foreach (var update in client.GetStreamingResponseAsync(history, options, ct))
                    {
                        if (double.IsNaN(first) && update.Text.Length > 0) first = sw.Elapsed.TotalMilliseconds;
                        reply.Append(update.Text);
                        foreach (var usage in update.Contents.OfType<UsageContent>()) promptTokens = (int?)usage.Details.InputTokenCount;
                    }
                    history.Add(new ChatMessage(ChatRole.Assistant, reply.ToString()));
                    rows.Add(new Row(client == cached, turn + 1, promptTokens ?? 0, (client.PromptCacheOf(width)?.ReusedTokens ?? 0) - reused,
                        Math.Round(first, 1), Math.Round(sw.Elapsed.TotalMilliseconds, 1)));
                    progress.Report(rows.Count);
                }
            rows = [.. rows.OrderBy(x => x.Cache).ThenBy(x => x.Turn)];
            if (r.GetValue(json))
            {
                r.WriteJson(new { kernels, rows = rows.Select(x => new { prompt_cache = x.Cache, turn = x.Turn, prompt_tokens = x.PromptTokens, reused_tokens = x.Reused, ttft_ms = x.FirstMs, total_ms = x.TotalMs }) });
                return 0;
            }
            var o = r.Out();
            o.WriteLine($"{kernels}\n| turn | prompt tokens | TTFT ms, no cache | TTFT ms, prompt cache (tokens reused) | total ms, no cache | total ms, prompt cache |\n|---:|---:|---:|---:|---:|---:|");
            foreach (var (without, with) in rows.Where(x => !x.Cache).Zip(rows.Where(x => x.Cache)))
                o.WriteLine($"| {without.Turn} | {without.PromptTokens} | {without.FirstMs} | {with.FirstMs} ({with.Reused}) | {without.TotalMs} | {with.TotalMs} |");
            return 0;
        });
        return command;
    }

    private sealed record Row(bool Cache, int Turn, int PromptTokens, long Reused, double FirstMs, double TotalMs);
}
