using System.ClientModel;
using System.Diagnostics;
using System.Net;
using System.Text;
using System.Text.Json;
using AnyPrecML.AI;
using Microsoft.Extensions.AI;
using OpenAI;
using OpenAI.Chat;
using OpenAI.Models;
using ChatMessage = OpenAI.Chat.ChatMessage;
using ChatFinishReason = OpenAI.Chat.ChatFinishReason;

namespace AnyPrecML.Tests;

/// <summary>The OpenAI endpoints against real clients (the official OpenAI package, its Microsoft.Extensions.AI adapter, HttpClient) on loopback.</summary>
[TestClass]
public sealed class OpenAIServerTests
{
    private const int MaxTokens = 40;
    private static ChatFixture _fixture = null!;
    private static LoopbackServer _server = null!;
    private static string _cli3 = null!, _cli8 = null!;
    private static readonly HttpClient Http = new();

    [ClassInitialize]
    public static async Task StartOnce(TestContext _)
    {
        _fixture = new ChatFixture();
        _server = await LoopbackServer.StartAsync(_fixture.ModelDirectory, new AnyPrecisionServerOptions { MaxConcurrentRequests = 4, MaxQueuedRequests = 8 });
        _cli3 = _fixture.Generate(3, MaxTokens);
        _cli8 = _fixture.Generate(8, MaxTokens);
    }

    [ClassCleanup]
    public static async Task Cleanup()
    {
        await _server.DisposeAsync();
        _fixture.Dispose();
    }

    private static ChatClient OpenAIChat(Uri v1, string model) =>
        new(model, new ApiKeyCredential("unused"), new OpenAIClientOptions { Endpoint = v1, NetworkTimeout = TimeSpan.FromSeconds(60) });

    private static ChatCompletionOptions Greedy(int maxTokens = MaxTokens) => new() { MaxOutputTokenCount = maxTokens, Temperature = 0 };

    private static async Task<(string Text, ChatFinishReason? Finish, ChatTokenUsage? Usage, DateTime First, DateTime Last)> StreamAsync(ChatClient chat, int maxTokens = MaxTokens, CancellationToken ct = default)
    {
        var text = new StringBuilder();
        ChatFinishReason? finish = null;
        ChatTokenUsage? usage = null;
        DateTime first = default, last = default;
        await foreach (var update in chat.CompleteChatStreamingAsync([new UserChatMessage(ChatFixture.Prompt)], Greedy(maxTokens), ct))
        {
            foreach (var part in update.ContentUpdate)
            {
                if (first == default) first = DateTime.UtcNow;
                text.Append(part.Text);
            }
            finish ??= update.FinishReason;
            usage ??= update.Usage;
            last = DateTime.UtcNow;
        }
        return (text.ToString(), finish, usage, first, last);
    }

    [TestMethod]
    public async Task OfficialClientChatAtTwoWidthsMatchesAnyprecGenerate()
    {
        foreach (var (model, expected) in new[] { ("stories260K@3bit", _cli3), ("stories260K@8bit", _cli8) })
        {
            var chat = OpenAIChat(_server.V1, model);
            ChatCompletion completion = await chat.CompleteChatAsync([new UserChatMessage(ChatFixture.Prompt)], Greedy());
            Assert.AreEqual(expected, completion.Content[0].Text, model);
            Assert.AreEqual(model, completion.Model);
            Assert.AreEqual(ChatFinishReason.Length, completion.FinishReason);
            Assert.AreEqual(MaxTokens, completion.Usage.OutputTokenCount);
            Assert.AreEqual(5, completion.Usage.InputTokenCount, "BOS + 4 tokens of 'Once upon a time'");

            var streamed = await StreamAsync(chat);
            Assert.AreEqual(expected, streamed.Text, model + " streamed");
            Assert.AreEqual(ChatFinishReason.Length, streamed.Finish);
            Assert.AreEqual(MaxTokens, streamed.Usage!.OutputTokenCount);
            Assert.AreEqual(MaxTokens + 5, streamed.Usage.TotalTokenCount);
        }
    }

    [TestMethod]
    public async Task ExtensionsAIAdapterChatsAtTwoWidths()
    {
        IChatClient chat = OpenAIChat(_server.V1, "stories260K").AsIChatClient();
        var response = await chat.GetResponseAsync(ChatFixture.Prompt, new ChatOptions { ModelId = "stories260K@3bit", MaxOutputTokens = MaxTokens, Temperature = 0 });
        Assert.AreEqual(_cli3, response.Text);
        Assert.AreEqual(MaxTokens, response.Usage!.OutputTokenCount);
        Assert.AreEqual(Microsoft.Extensions.AI.ChatFinishReason.Length, response.FinishReason);

        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in chat.GetStreamingResponseAsync(ChatFixture.Prompt, new ChatOptions { ModelId = "stories260K@8bit", MaxOutputTokens = MaxTokens, Temperature = 0 }))
            updates.Add(u);
        var streamed = updates.ToChatResponse();
        Assert.AreEqual(_cli8, streamed.Text);
        Assert.AreEqual(MaxTokens, streamed.Usage!.OutputTokenCount);
        Assert.AreEqual("stories260K@8bit", streamed.ModelId);
    }

    [TestMethod]
    public async Task TwoConcurrentStreamsAtDifferentWidthsBothComplete()
    {
        const int n = 150;
        string expected3 = _fixture.Generate(3, n), expected8 = _fixture.Generate(8, n);
        var at3 = StreamAsync(OpenAIChat(_server.V1, "stories260K@3bit"), n);
        var at8 = StreamAsync(OpenAIChat(_server.V1, "stories260K@8bit"), n);
        await Task.WhenAll(at3, at8);
        Assert.AreEqual(expected3, at3.Result.Text);
        Assert.AreEqual(expected8, at8.Result.Text);
        Assert.AreEqual(n, at3.Result.Usage!.OutputTokenCount);
        Assert.AreEqual(n, at8.Result.Usage!.OutputTokenCount);
        // They really ran at the same time: each started before the other finished.
        Assert.IsLessThan(at8.Result.Last, at3.Result.First);
        Assert.IsLessThan(at3.Result.Last, at8.Result.First);
    }

    [TestMethod]
    public async Task ModelsListEveryWidthAndTheDefault()
    {
        var models = new OpenAIModelClient(new ApiKeyCredential("unused"), new OpenAIClientOptions { Endpoint = _server.V1 });
        var ids = (await models.GetModelsAsync()).Value.Select(m => m.Id).ToArray();
        CollectionAssert.AreEqual(new[] { "stories260K", "stories260K@3bit", "stories260K@4bit", "stories260K@5bit", "stories260K@6bit", "stories260K@7bit", "stories260K@8bit" }, ids);
        using var doc = JsonDocument.Parse(await Http.GetStringAsync(new Uri(_server.V1, "v1/models")));
        Assert.AreEqual(8, doc.RootElement.GetProperty("data")[0].GetProperty("bits").GetInt32(), "the bare name is the parent width");
    }

    [TestMethod]
    public async Task CompletionsEndpointMatchesGenerateStreamedOrNot()
    {
        string body = JsonSerializer.Serialize(new { model = "stories260K@3bit", prompt = ChatFixture.Prompt, max_tokens = MaxTokens });
        using var response = await Http.PostAsync(new Uri(_server.Address, "v1/completions"), new StringContent(body, Encoding.UTF8, "application/json"));
        Assert.AreEqual(HttpStatusCode.OK, response.StatusCode);
        using var doc = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
        Assert.AreEqual("text_completion", doc.RootElement.GetProperty("object").GetString());
        Assert.AreEqual(_cli3, doc.RootElement.GetProperty("choices")[0].GetProperty("text").GetString());
        Assert.AreEqual("length", doc.RootElement.GetProperty("choices")[0].GetProperty("finish_reason").GetString());
        Assert.AreEqual(MaxTokens, doc.RootElement.GetProperty("usage").GetProperty("completion_tokens").GetInt32());

        string streamBody = JsonSerializer.Serialize(new { model = "stories260K@8bit", prompt = ChatFixture.Prompt, max_tokens = MaxTokens, stream = true });
        using var stream = await Http.PostAsync(new Uri(_server.Address, "v1/completions"), new StringContent(streamBody, Encoding.UTF8, "application/json"));
        Assert.AreEqual("text/event-stream", stream.Content.Headers.ContentType!.MediaType);
        string[] events = (await stream.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.IsTrue(events.All(e => e.StartsWith("data: ", StringComparison.Ordinal)));
        Assert.AreEqual("data: [DONE]", events[^1]);
        var chunks = events[..^1].Select(e => JsonDocument.Parse(e["data: ".Length..]).RootElement).ToList();
        Assert.AreEqual(_cli8, string.Concat(chunks.Where(c => c.GetProperty("choices").GetArrayLength() > 0).Select(c => c.GetProperty("choices")[0].GetProperty("text").GetString())));
        Assert.AreEqual(MaxTokens, chunks[^1].GetProperty("usage").GetProperty("completion_tokens").GetInt32(), "usage comes in the final chunk");
    }

    /// <summary>Posts raw bytes and returns the status and the parsed error object.</summary>
    private static async Task<(HttpStatusCode Status, JsonElement Error)> PostRaw(string path, HttpContent content)
    {
        using var response = await Http.PostAsync(new Uri(_server.Address, path), content);
        string text = await response.Content.ReadAsStringAsync();
        Assert.AreEqual("application/json", response.Content.Headers.ContentType?.MediaType, text);
        return (response.StatusCode, JsonDocument.Parse(text).RootElement.GetProperty("error").Clone());
    }

    private static StringContent JsonBody(string json) => new(json, Encoding.UTF8, "application/json");

    [TestMethod]
    public async Task BadInputGetsOpenAIErrorsAndTheServerKeepsAnswering()
    {
        string tooLong = string.Concat(Enumerable.Repeat("Once upon a time there was a cat. ", 100));
        var cases = new (string Path, HttpContent Body, HttpStatusCode Status, string Code, string MessagePart)[]
        {
            ("v1/chat/completions", JsonBody("{\"model\": \"stories260K\", \"messages\": ["), HttpStatusCode.BadRequest, "invalid_json", "not valid JSON"),
            ("v1/chat/completions", JsonBody("{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"), HttpStatusCode.BadRequest, "model_not_found", "unknown model 'gpt-4o'"),
            ("v1/chat/completions", JsonBody("{\"model\": \"stories260K@2bit\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"), HttpStatusCode.BadRequest, "model_not_found", "3..8"),
            ("v1/completions", JsonBody(JsonSerializer.Serialize(new { model = "stories260K", prompt = tooLong })), HttpStatusCode.BadRequest, "invalid_value", "context is 512"),
            ("v1/chat/completions", JsonBody("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": -5}"), HttpStatusCode.BadRequest, "invalid_value", "max tokens must be 0 or more, not -5"),
            ("v1/chat/completions", JsonBody("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"temperature\": \"hot\"}"), HttpStatusCode.BadRequest, "invalid_value", "'temperature' must be a number"),
            ("v1/chat/completions", JsonBody("{\"messages\": []}"), HttpStatusCode.BadRequest, "invalid_value", "'messages'"),
            ("v1/engines", JsonBody("{}"), HttpStatusCode.NotFound, "not_found", "unknown route POST /v1/engines"),
            ("v1/completions", JsonBody(JsonSerializer.Serialize(new { prompt = new string('a', 2 << 20) })), HttpStatusCode.RequestEntityTooLarge, "request_too_large", "1048576"),
        };
        foreach (var (path, body, status, code, part) in cases)
        {
            var (actual, error) = await PostRaw(path, body);
            Assert.AreEqual(status, actual, $"{path}: {error}");
            Assert.AreEqual(code, error.GetProperty("code").GetString());
            StringAssert.Contains(error.GetProperty("message").GetString(), part);
            Assert.AreEqual(HttpStatusCode.OK, (await Http.GetAsync(new Uri(_server.Address, "health"))).StatusCode, "the server still answers");
        }
        // An oversized body sent without Content-Length (chunked) is cut off by the server's limit while it is read.
        var chunked = new StreamContent(new MemoryStream(Encoding.UTF8.GetBytes(JsonSerializer.Serialize(new { prompt = new string('a', 2 << 20) }))));
        chunked.Headers.ContentType = new("application/json");
        var request = new HttpRequestMessage(HttpMethod.Post, new Uri(_server.Address, "v1/completions")) { Content = chunked };
        request.Headers.TransferEncodingChunked = true;
        using (var response = await Http.SendAsync(request))
            Assert.AreEqual(HttpStatusCode.RequestEntityTooLarge, response.StatusCode);

        // The official client surfaces the status and message.
        var e = await Assert.ThrowsAsync<ClientResultException>(() => OpenAIChat(_server.V1, "stories260K@12bit").CompleteChatAsync([new UserChatMessage("hi")]));
        Assert.AreEqual(400, e.Status);
        StringAssert.Contains(e.Message, "unknown width");
        var ok = await OpenAIChat(_server.V1, "stories260K@3bit").CompleteChatAsync([new UserChatMessage(ChatFixture.Prompt)], Greedy());
        Assert.AreEqual(_cli3, ok.Value.Content[0].Text, "and still generates afterwards");
    }

    private static async Task<JsonElement> Health(LoopbackServer server) =>
        JsonDocument.Parse(await Http.GetStringAsync(new Uri(server.Address, "health"))).RootElement.Clone();

    [TestMethod]
    public async Task FullQueueGets429AndEverySlotComesBack()
    {
        await using var server = await LoopbackServer.StartAsync(_fixture.ModelDirectory, new AnyPrecisionServerOptions { MaxConcurrentRequests = 1, MaxQueuedRequests = 1 });
        const int n = 150;
        string expected = _fixture.Generate(3, n);
        string body = JsonSerializer.Serialize(new { model = "stories260K@3bit", prompt = ChatFixture.Prompt, max_tokens = n });
        var responses = await Task.WhenAll(Enumerable.Range(0, 8).Select(async _ =>
        {
            using var r = await Http.PostAsync(new Uri(server.Address, "v1/completions"), JsonBody(body));
            return (r.StatusCode, Json: JsonDocument.Parse(await r.Content.ReadAsStringAsync()).RootElement.Clone());
        }));
        // One runs, one waits; of eight sent at once, the rest are refused at the door.
        var served = responses.Where(r => r.StatusCode == HttpStatusCode.OK).ToList();
        var refused = responses.Where(r => r.StatusCode == HttpStatusCode.TooManyRequests).ToList();
        Assert.AreEqual(8, served.Count + refused.Count);
        Assert.IsGreaterThanOrEqualTo(2, served.Count);
        Assert.IsGreaterThanOrEqualTo(1, refused.Count);
        foreach (var s in served) Assert.AreEqual(expected, s.Json.GetProperty("choices")[0].GetProperty("text").GetString());
        foreach (var r in refused) Assert.AreEqual("rate_limit_exceeded", r.Json.GetProperty("error").GetProperty("code").GetString());
        var health = await Health(server);
        Assert.AreEqual(0, health.GetProperty("running").GetInt32());
        Assert.AreEqual(0, health.GetProperty("queued").GetInt32());
    }

    [TestMethod]
    public async Task CancellingAStreamMidwayFreesTheSlot()
    {
        // One slot and no queue: until the cancelled stream gives its slot back, every other request gets 429.
        // (That the generation itself stops between tokens is shown in-process, in ChatClientTests: over
        // loopback the server can finish stories260K's 480 tokens into the socket buffers before the
        // disconnect arrives, so the token count cannot tell here.)
        await using var server = await LoopbackServer.StartAsync(_fixture.ModelDirectory, new AnyPrecisionServerOptions { MaxConcurrentRequests = 1, MaxQueuedRequests = 0 });
        using var cts = new CancellationTokenSource();
        int pieces = 0;
        await Assert.ThrowsAsync<OperationCanceledException>(async () =>
        {
            await foreach (var update in OpenAIChat(server.V1, "stories260K@3bit").CompleteChatStreamingAsync([new UserChatMessage(ChatFixture.Prompt)], Greedy(480), cts.Token))
                if (update.ContentUpdate.Count > 0 && ++pieces == 3) cts.Cancel();
        });
        var sw = Stopwatch.StartNew();
        while ((await Health(server)).GetProperty("running").GetInt32() != 0)
        {
            Assert.IsLessThan(10.0, sw.Elapsed.TotalSeconds, "the slot was not freed after the client went away");
            await Task.Delay(20);
        }
        var next = await OpenAIChat(server.V1, "stories260K@3bit").CompleteChatAsync([new UserChatMessage(ChatFixture.Prompt)], Greedy());
        Assert.AreEqual(_cli3, next.Value.Content[0].Text, "the freed slot serves the next request");
        Assert.AreEqual(0, (await Health(server)).GetProperty("running").GetInt32());
    }

    [TestMethod]
    public async Task AnyprecServeProcessAnswersTheOfficialClient()
    {
        // The real command in its own process: `dotnet anyprec.dll serve -m DIR --port 0` prints its address.
        string dll = Path.Combine(AppContext.BaseDirectory, "anyprec.dll");
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in new[] { dll, "serve", "-m", _fixture.ModelDirectory, "--port", "0", "--bits", "3" }) start.ArgumentList.Add(a);
        using var process = Process.Start(start)!;
        try
        {
            var line = process.StandardOutput.ReadLineAsync();
            Assert.IsTrue(await Task.WhenAny(line, Task.Delay(TimeSpan.FromSeconds(60))) == line, "serve did not print its address");
            string? text = await line;
            if (text is null) Assert.Fail("serve exited: " + await process.StandardError.ReadToEndAsync());
            StringAssert.StartsWith(text, "listening on http://127.0.0.1:");
            StringAssert.Contains(text, "default 3 bits");
            var address = new Uri(text["listening on ".Length..text.IndexOf(": ", "listening on ".Length, StringComparison.Ordinal)] + "/v1");
            var completion = await OpenAIChat(address, "stories260K").CompleteChatAsync([new UserChatMessage(ChatFixture.Prompt)], Greedy());
            Assert.AreEqual(_cli3, completion.Value.Content[0].Text, "the bare name runs at --bits");
            var streamed = await StreamAsync(OpenAIChat(address, "stories260K@8bit"));
            Assert.AreEqual(_cli8, streamed.Text);
        }
        finally
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
        }
    }

    [TestMethod]
    public void BenchServeReportsEveryLevel()
    {
        var (code, output, err) = Cli.Run("bench", "serve", "--model", _fixture.ModelDirectory, "--clients", "1", "3", "--requests", "2", "--max-tokens", "8", "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        var rows = doc.RootElement.GetProperty("rows");
        Assert.AreEqual(2, rows.GetArrayLength());
        Assert.AreEqual(6, rows[1].GetProperty("requests").GetInt32(), "3 clients × 2 requests");
        foreach (var row in rows.EnumerateArray())
        {
            // Every request streamed its 8 tokens: tokens/s is 8 × requests/s (up to rounding).
            Assert.AreEqual(8 * row.GetProperty("requests_per_second").GetDouble(), row.GetProperty("tokens_per_second").GetDouble(), 0.5);
            Assert.IsLessThanOrEqualTo(row.GetProperty("ttft_p99_ms").GetDouble(), row.GetProperty("ttft_p50_ms").GetDouble());
            // Decode steps per pass: exactly 1 for one client; with three, at most the two that share a width.
            double perPass = row.GetProperty("steps_per_pass").GetDouble();
            if (row.GetProperty("clients").GetInt32() == 1) Assert.AreEqual(1.0, perPass);
            else Assert.IsLessThanOrEqualTo(2.0, perPass);
        }
        CollectionAssert.AreEqual(new[] { 3, 8 }, doc.RootElement.GetProperty("widths").EnumerateArray().Select(w => w.GetInt32()).ToArray());
    }

    [TestMethod]
    public void ServeRefusesWhatIsNotAnAnyPrecisionDirectory()
    {
        var (code, _, err) = Cli.Run("serve", "--model", TestData.Stories260K, "--port", "0");
        Assert.AreEqual(2, code, "bad input exits 2");
        StringAssert.StartsWith(err, "error: ");
        StringAssert.Contains(err, "not an any-precision model directory");
        var (batchCode, _, batchErr) = Cli.Run("serve", "--model", _fixture.ModelDirectory, "--port", "0", "--max-batch", "0");
        Assert.AreEqual(2, batchCode);
        Assert.AreEqual("error: --max-batch must be 1 or more.", batchErr.Trim());
    }
}
