using System.CommandLine;
using System.Diagnostics;
using System.Text;
using System.Text.Json;
using AnyPrecML.AI;
using Microsoft.Extensions.DependencyInjection;

namespace AnyPrecML.Cli;

/// <summary>
/// `anyprec bench serve`: the OpenAI server under load. It starts `serve`'s host on a free loopback port and runs
/// 1, 4, 16 concurrent clients, each streaming completions back to back (widths round-robin over the clients),
/// and reports requests/s, generated tokens/s, and p50/p99 time to the first token.
/// </summary>
internal static class BenchServeCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        model.Description = "An any-precision model directory.";
        var clients = new Option<int[]>("--clients") { Description = "Concurrent client counts to measure.", DefaultValueFactory = _ => [1, 4, 16], AllowMultipleArgumentsPerToken = true };
        var requests = new Option<int>("--requests") { Description = "Requests per client at each level.", DefaultValueFactory = _ => 8 };
        var maxTokens = new Option<int>("--max-tokens") { Description = "Tokens per request.", DefaultValueFactory = _ => 64 };
        var widths = new Option<int[]>("--widths") { Description = "Widths the clients ask for, round-robin (default: the seed and the parent width).", AllowMultipleArgumentsPerToken = true };
        var concurrent = new Option<int>("--max-concurrent") { Description = "Server slots (requests generating at once).", DefaultValueFactory = _ => 16 };
        var maxBatch = CommonOptions.MaxBatch();
        var accuracy = CommonOptions.Accuracy();
        var json = CommonOptions.Json();
        var command = new Command("serve", "Load `anyprec serve` with concurrent streaming clients: requests/s, tokens/s, time to first token.")
        {
            model, clients, requests, maxTokens, widths, concurrent, maxBatch, accuracy, json,
        };
        command.SetAction(async (r, ct) =>
        {
            int[] levels = r.GetValue(clients)!;
            if (levels.Length == 0 || levels.Any(c => c < 1)) throw new ArgumentException("--clients must list counts of 1 or more.");
            if (r.GetValue(requests) < 1) throw new ArgumentException("--requests must be 1 or more.");
            if (r.GetValue(maxTokens) < 1) throw new ArgumentException("--max-tokens must be 1 or more.");
            if (r.GetValue(maxBatch) < 1) throw new ArgumentException("--max-batch must be 1 or more.");
            var server = new AnyPrecisionServerOptions { MaxConcurrentRequests = r.GetValue(concurrent), MaxQueuedRequests = levels.Max() };
            await using var app = ServeCommand.Host(r.GetValue(model)!, "http://127.0.0.1:0", server, o =>
            {
                o.MaxBatch = r.GetValue(maxBatch);
                o.Backend = CommonOptions.Backend(r.GetValue(accuracy));
            });
            await app.StartAsync(ct);
            var chat = app.Services.GetRequiredService<AnyPrecisionChatClient>();
            var meta = chat.Metadata;
            int[] bits = r.GetValue(widths) is { Length: > 0 } w ? w : [meta.SupportedBits[0], meta.SupportedBits[^1]];
            foreach (int b in bits) meta.ModelIds.Single(id => id == AnyPrecisionChatClient.ModelId(meta.ModelName, b)); // unknown widths fail here
            var completions = new Uri(ServeCommand.Address(app) + "/v1/completions");
            using var http = new HttpClient { Timeout = TimeSpan.FromMinutes(10) };

            // Warm-up, one request per width measured: the first call pays JIT and session start, a width's first its tables.
            foreach (int b in bits) await Request(http, completions, AnyPrecisionChatClient.ModelId(meta.ModelName, b), 8, ct);
            var rows = new List<object>();
            if (!r.GetValue(json)) r.Out().WriteLine($"{meta.ModelName}, widths {string.Join(",", bits)}, {r.GetValue(maxTokens)} tokens per request, {server.MaxConcurrentRequests} server slots, decode batches up to {r.GetValue(maxBatch)}, {chat.Engine.Kernels}, {Environment.ProcessorCount} cores\n"
                + "| clients | requests | requests/s | tokens/s | TTFT p50 ms | TTFT p99 ms | decode steps per pass |\n|---|---|---|---|---|---|---|");
            long requestsDone = 0;
            var progress = new ConsoleProgress<long>(r.Err(), "bench serve", done => (done, levels.Sum(l => (long)l * r.GetValue(requests))), "requests");
            foreach (int level in levels)
            {
                long passes0 = chat.Batching.Batches, steps0 = chat.Batching.BatchedSteps;
                var sw = Stopwatch.StartNew();
                var results = await Task.WhenAll(Enumerable.Range(0, level).Select(async client =>
                {
                    string id = AnyPrecisionChatClient.ModelId(meta.ModelName, bits[client % bits.Length]);
                    var mine = new List<(double Ttft, int Tokens)>();
                    for (int i = 0; i < r.GetValue(requests); i++)
                    {
                        mine.Add(await Request(http, completions, id, r.GetValue(maxTokens), ct));
                        progress.Report(Interlocked.Increment(ref requestsDone));
                    }
                    return mine;
                }));
                double seconds = sw.Elapsed.TotalSeconds;
                var all = results.SelectMany(x => x).ToList();
                var ttft = all.Select(x => x.Ttft).Order().ToList();
                var row = new
                {
                    clients = level, requests = all.Count,
                    requests_per_second = Math.Round(all.Count / seconds, 2),
                    tokens_per_second = Math.Round(all.Sum(x => x.Tokens) / seconds, 1),
                    ttft_p50_ms = Math.Round(Percentile(ttft, 0.50), 1),
                    ttft_p99_ms = Math.Round(Percentile(ttft, 0.99), 1),
                    // Decode steps per pass: how many requests' steps the batcher ran together, on average.
                    steps_per_pass = chat.Batching.Batches == passes0 ? (double?)null : Math.Round((double)(chat.Batching.BatchedSteps - steps0) / (chat.Batching.Batches - passes0), 2),
                };
                rows.Add(row);
                if (!r.GetValue(json)) progress.Line($"| {row.clients} | {row.requests} | {row.requests_per_second} | {row.tokens_per_second} | {row.ttft_p50_ms} | {row.ttft_p99_ms} | {row.steps_per_pass?.ToString() ?? "- (off)"} |", r.Out());
            }
            long peak = Process.GetCurrentProcess().PeakWorkingSet64;
            if (r.GetValue(json)) r.WriteJson(new { model = meta.ModelName, widths = bits, max_tokens = r.GetValue(maxTokens), rows, peak_working_set_mb = peak >> 20 });
            else r.Out().WriteLine($"\npeak working set of the process (server and clients): {peak >> 20} MB");
            await app.StopAsync(CancellationToken.None);
            return 0;
        });
        return command;
    }

    /// <summary>One streamed completion: milliseconds to the first text, and the tokens the final usage reports.</summary>
    private static async Task<(double Ttft, int Tokens)> Request(HttpClient http, Uri completions, string model, int maxTokens, CancellationToken ct)
    {
        string body = JsonSerializer.Serialize(new { model, prompt = "Once upon a time", max_tokens = maxTokens, stream = true });
        long start = Stopwatch.GetTimestamp();
        using var request = new HttpRequestMessage(HttpMethod.Post, completions) { Content = new StringContent(body, Encoding.UTF8, "application/json") };
        using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct);
        if (!response.IsSuccessStatusCode) throw new InvalidOperationException($"the server answered {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync(ct)}");
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync(ct));
        double ttft = double.NaN;
        int tokens = 0;
        while (await reader.ReadLineAsync(ct) is { } line)
        {
            if (!line.StartsWith("data: {", StringComparison.Ordinal)) continue;
            using var chunk = JsonDocument.Parse(line.AsMemory("data: ".Length));
            var root = chunk.RootElement;
            if (double.IsNaN(ttft) && root.GetProperty("choices") is { } choices && choices.GetArrayLength() > 0 && choices[0].GetProperty("text").GetString() is { Length: > 0 })
                ttft = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            if (root.TryGetProperty("usage", out var usage)) tokens = usage.GetProperty("completion_tokens").GetInt32();
        }
        return (ttft, tokens);
    }

    private static double Percentile(List<double> sorted, double p) => sorted.Count == 0 ? double.NaN : sorted[Math.Min(sorted.Count - 1, (int)Math.Ceiling(p * sorted.Count) - 1)];
}
