using System.Text.Json;
using AnyPrecML.AI;
using AnyPrecML.Models;
using AnyPrecML.Quantization;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace AnyPrecML.Tests;

/// <summary>
/// stories260K quantized once into a directory named "stories260K" (so model ids read <c>stories260K@3bit</c>),
/// and what <c>anyprec generate</c> prints for it: the independent reference of the chat tests.
/// </summary>
internal sealed class ChatFixture : IDisposable
{
    public const string Prompt = "Once upon a time";
    private readonly TestData.TempDir _dir = TestData.NewTempDir();

    public ChatFixture()
    {
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        AnyPrecisionQuantizer.Quantize(source, ModelDirectory, new UniformSensitivity(), new QuantizerOptions());
    }

    public string ModelDirectory => _dir["stories260K"];

    /// <summary>Greedy text of `anyprec generate --json` at <paramref name="bits"/> for <paramref name="prompt"/>.</summary>
    public string Generate(int bits, int maxTokens, string prompt = Prompt)
    {
        var (code, output, err) = Cli.Run("generate", "--model", ModelDirectory, "--bits", bits.ToString(), "--prompt", prompt, "--max-tokens", maxTokens.ToString(), "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        Assert.AreEqual(maxTokens, doc.RootElement.GetProperty("tokens").GetInt32(), "the reference should run to max tokens, not stop at EOS");
        return doc.RootElement.GetProperty("text").GetString()!;
    }

    public void Dispose() => _dir.Dispose();
}

/// <summary><c>MapAnyPrecisionOpenAI</c> in a real Kestrel host on a free loopback port.</summary>
internal sealed class LoopbackServer : IAsyncDisposable
{
    private readonly WebApplication _app;

    private LoopbackServer(WebApplication app, Uri address)
    {
        _app = app;
        Address = address;
    }

    /// <summary>The server's root, e.g. http://127.0.0.1:41234/.</summary>
    public Uri Address { get; }

    /// <summary>The OpenAI base address (…/v1).</summary>
    public Uri V1 => new(Address, "v1");

    public AnyPrecisionChatClient Client => _app.Services.GetRequiredService<AnyPrecisionChatClient>();

    public static async Task<LoopbackServer> StartAsync(string modelDirectory, AnyPrecisionServerOptions options)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.Services.AddAnyPrecisionChatClient(modelDirectory);
        var app = builder.Build();
        app.MapAnyPrecisionOpenAI(options);
        await app.StartAsync();
        string address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.Single();
        return new LoopbackServer(app, new Uri(address + "/"));
    }

    public async ValueTask DisposeAsync()
    {
        await _app.StopAsync();
        await _app.DisposeAsync();
    }
}
